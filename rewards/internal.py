"""Internal rewards: read the policy's own per-token signals on its completions.

An :class:`InternalReward` declares the signals it needs (``signals``); the RLIF trainer
computes all of them in one no-grad pass of the current policy and hands each reward the
keyword argument ``token_signals``: one dict per completion mapping a signal name to a 1-D
tensor over that completion's tokens (up to and including EOS, temperature-scaled with the
sampling temperature). The reward turns them into one float per completion.

Signals: ``logps`` (log-prob of the sampled token), ``entropy`` (``H(softmax(z/T))``),
``self_certainty`` (``KL(U || softmax(z/T))``). A completion whose value is not finite (or that
has no token) gets ``None``: TRL then leaves it out of the group baseline, with a warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any, ClassVar

from .answers import closing_brace
from .base import Reward, completion_text

logger = logging.getLogger("intrinsic")

SIGNALS = ("logps", "entropy", "self_certainty")
"""The per-token signals an :class:`InternalReward` may declare (computed by ``trainers.signals.token_signals``;
the logit-lens ones are :data:`rewards.consistency.LENS_SIGNALS`)."""


class InternalReward(Reward):
    """Base of rewards that read signals; subclasses set ``signals`` and implement :meth:`reduce`."""

    abstract = True
    signals: ClassVar[tuple[str, ...]] = ()

    def reduce(self, signals: dict[str, Any]) -> float:
        """One completion's per-token signals (1-D tensors) -> its reward."""
        raise NotImplementedError

    def __call__(self, prompts: list, completions: list, token_signals: list[dict] | None = None, **columns):
        if token_signals is None:
            raise RuntimeError(
                f"reward {self.name!r} reads the policy's internal signals: train it with "
                "trainers.RLIFTrainer (or pass token_signals=...)"
            )
        if len(token_signals) != len(completions):
            raise ValueError(f"{self.name}: {len(token_signals)} token_signals for {len(completions)} completions")
        out: list[float | None] = []
        for i, signals in enumerate(token_signals):
            value = self.reduce(signals) if all(s in signals for s in self.signals) else None
            if value is None or not math.isfinite(value):
                logger.warning("%s: completion %d has no finite value (%s); skipped", self.name, i, value)
                value = None
            out.append(value)
        return out


def _tail(values, last_k: int | None, last_fraction: float | None):
    """The last ``last_k`` tokens, or the last ``ceil(last_fraction * n)`` tokens (at least one)."""
    n = values.shape[0]
    if last_k is not None:
        return values[max(n - last_k, 0) :]
    if last_fraction is not None:
        return values[n - max(1, min(n, math.ceil(round(last_fraction * n, 9)))) :] if n else values
    return values


def _mean(values) -> float | None:
    return float(values.float().mean()) if values.numel() else None


class SelfCertainty(InternalReward):
    """Intuitor: ``mean_t KL(U || softmax(z_t / T))`` over the completion's tokens.

    >>> import torch
    >>> SelfCertainty()(prompts=["p"], completions=["c"], token_signals=[{"self_certainty": torch.tensor([1.0, 3.0])}])
    [2.0]
    """

    name = "self_certainty"
    signals = ("self_certainty",)

    def reduce(self, signals):
        return _mean(signals["self_certainty"])


def has_boxed_answer(text: str) -> bool:
    """RENT's parse check: the text's last ``\\boxed`` (or ``\\fbox``) opens a brace group that closes.

    >>> has_boxed_answer("so \\\\boxed{12}."), has_boxed_answer("so 12"), has_boxed_answer("\\\\boxed{1")
    (True, False, False)
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return False
    if text.startswith("\\boxed ", start):  # rent-rl (verl's last_boxed_only_string) reads "\\boxed 5" too
        return True
    opening = text.find("{", start)
    return opening >= 0 and closing_brace(text, opening) is not None


class NegativeEntropy(InternalReward):
    """RENT / EM-RL: ``-mean_t H(softmax(z_t / T))``, optionally over the last tokens only.

    ``unparseable_entropy``: RENT's format penalty (``trainer.base_format``/``entropy_base`` in
    rent-rl): a completion without a closed ``\\boxed{}`` answer is scored as if its mean entropy
    were this value (rent-rl: 7.0), whatever its tokens' entropy.

    >>> import torch
    >>> h = {"entropy": torch.tensor([4.0, 2.0, 1.0])}
    >>> NegativeEntropy()(["p"], ["c"], token_signals=[h]), NegativeEntropy(last_k=2)(["p"], ["c"], token_signals=[h])
    ([-2.3333332538604736], [-1.5])
    >>> NegativeEntropy(unparseable_entropy=7.0)(["p", "p"], ["no box", "\\\\boxed{3}"], token_signals=[h, h])
    [-7.0, -2.3333332538604736]
    """

    name = "negative_entropy"
    signals = ("entropy",)

    def __init__(self, last_k: int | None = None, last_fraction: float | None = None,
                 unparseable_entropy: float | None = None):
        if last_k is not None and last_fraction is not None:
            raise ValueError("negative_entropy: give last_k or last_fraction, not both")
        if last_k is not None and last_k < 1:
            raise ValueError("negative_entropy: last_k must be >= 1")
        if last_fraction is not None and not 0 < last_fraction <= 1:
            raise ValueError("negative_entropy: last_fraction must be in (0, 1]")
        if unparseable_entropy is not None and not math.isfinite(unparseable_entropy):
            raise ValueError("negative_entropy: unparseable_entropy must be a finite number")
        self.last_k, self.last_fraction, self.unparseable_entropy = last_k, last_fraction, unparseable_entropy

    def __call__(self, prompts: list, completions: list, token_signals: list[dict] | None = None, **columns):
        out = super().__call__(prompts, completions, token_signals=token_signals, **columns)
        if self.unparseable_entropy is None:
            return out
        return [value if has_boxed_answer(completion_text(c)) else -float(self.unparseable_entropy)
                for value, c in zip(out, completions)]

    def reduce(self, signals):
        mean = _mean(_tail(signals["entropy"], self.last_k, self.last_fraction))
        return None if mean is None else -mean


class SequenceLogProb(InternalReward):
    """Mean log-probability of the sampled tokens (a length-normalised sequence likelihood)."""

    name = "sequence_logprob"
    signals = ("logps",)

    def reduce(self, signals):
        return _mean(signals["logps"])
