"""DeCRED's options and head weights: which heads, how they are weighted, which are on at a step.

Pure functions of the options and the step (no model): LayerSkip's scales (:func:`layer_scales`),
torchtune's curricula (:func:`active_layers`) and the weights a step gives every head
(:func:`step_weights`); docs/METHODS.md gives their sources.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

SCALES: dict[str, Callable[[int], float]] = {
    "uniform": lambda l: 1.0,
    "l": lambda l: float(l),
    "sum_l": lambda l: float(l),  # summed cumulatively over the active heads in layer_scales
    "sqrt_l": lambda l: math.sqrt(l),
    "inv_l": lambda l: 1.0 / l,
    "inv_sqrt_l": lambda l: 1.0 / math.sqrt(l),
}
CURRICULA = ("none", "rotational", "gradual", "round_robin")


@dataclass
class DeCREDOptions:
    """Auxiliary decoder heads and their loss (the ``decred:`` section of a recipe config)."""

    layers: list[int] = field(default_factory=list, metadata={
        "help": "decoder blocks (1-based, 'after block l') that get an auxiliary head; the final head is always included"})
    head: Literal["separate", "shared"] = field(default="separate", metadata={
        "help": "separate: a new linear head per layer (DeCRED); shared: the model's final norm + LM head (LayerSkip)"})
    init: Literal["lm_head", "random"] = field(default="lm_head", metadata={
        "help": "initialisation of separate heads: a copy of the LM head, or random (N(0, initializer_range), as "
                "transformers initialises a new Linear; the CTC head always is)"})
    final_norm: bool = field(default=False, metadata={
        "help": "apply the model's final norm to intermediate states before a separate head (shared heads always do)"})
    weights: list[float] | None = field(default=None, metadata={
        "help": "fixed head weights, one per aux layer then the final head (DeCRED: [0.3, 0.7]); overrides scale"})
    scale: Literal["uniform", "l", "sum_l", "sqrt_l", "inv_l", "inv_sqrt_l"] = field(default="uniform", metadata={
        "help": "LayerSkip per-layer scale s(l), normalised over the active heads (used when weights is null)"})
    curriculum: Literal["none", "rotational", "gradual", "round_robin"] = field(default="none", metadata={
        "help": "which aux heads are on at a step: all; rotational (torchtune: the set of layers rolls by one block per "
                "step over all blocks, shared head only); gradual (torchtune: deep layers first); round_robin (aux head i "
                "when i ≡ step mod rotation)"})
    rotation: int = field(default=2, metadata={"help": "round_robin curriculum: aux head i is on when i ≡ step (mod rotation)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing ε of every head's cross-entropy"})
    chunk_size: int = field(default=1024, metadata={"help": "tokens per chunk of a head projection"})
    ctc_weight: float = field(default=0.0, metadata={
        "help": "λ of the hybrid λ·CTC + (1-λ)·attention loss (encoder-decoder; adds a CTC head on the encoder)"})
    ctc_blank: int | None = field(default=None, metadata={"help": "CTC blank id (null: the pad token id)"})
    detach: bool = field(default=False, metadata={
        "help": "probe mode: heads read detached states and the final weight is 1 (plain fine-tuning + trained probes)"})
    export_heads: bool = field(default=True, metadata={"help": "keep the heads in the final saved model (false: strip)"})
    decode_weights: list[float] | None = field(default=None, metadata={
        "help": "decode-time logit averaging Σ_k w_k z^k (aux layers then final); null: final head only"})

    def __post_init__(self):
        if sorted(set(self.layers)) != list(self.layers):
            raise ValueError(f"decred.layers must be increasing and distinct, got {self.layers}")
        if any(l < 1 for l in self.layers):
            raise ValueError(f"decred.layers are 1-based block numbers, got {self.layers}")
        for name in ("weights", "decode_weights"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.layers) + 1:
                raise ValueError(f"decred.{name} needs one weight per aux layer plus the final head "
                                 f"({len(self.layers) + 1}), got {len(value)}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("decred.label_smoothing must be in [0, 1)")
        if not 0.0 <= self.ctc_weight < 1.0:
            raise ValueError("decred.ctc_weight must be in [0, 1)")
        if self.rotation < 1 or self.chunk_size < 1:
            raise ValueError("decred.rotation and decred.chunk_size must be positive")
        if self.curriculum == "rotational" and (self.head != "shared" or self.weights is not None):
            raise ValueError("decred.curriculum rotational rolls the heads over every decoder block (torchtune), so it "
                             "needs head: shared and weights: null (scale weights); use round_robin for separate heads")

    def check_depth(self, num_layers: int) -> None:
        if self.layers and self.layers[-1] >= num_layers:
            raise ValueError(f"decred.layers {self.layers}: the decoder has {num_layers} blocks; aux heads go after "
                             f"blocks 1..{num_layers - 1} (block {num_layers} is the final head)")


def layer_scales(layers: list[int], num_layers: int, scale: str = "uniform", active: list[bool] | None = None) -> list[float]:
    """LayerSkip weights of heads at ``layers`` plus the final layer ``L = num_layers``, as
    torchtune's ``early_exit_loss`` scale functions compute them: with ``a_1 < ... < a_m = L`` the
    active heads (the final head is always active), ``w_{a_j} = s_j / Σ_i s_i`` and 0 for the
    others, where ``s_j`` is ``1, a_j, √a_j, 1/a_j, 1/√a_j`` or, for ``sum_l``, the cumulative
    ``Σ_{i≤j} a_i`` over the *active* heads (not ``Σ_{i≤l} i``).

    >>> [round(w, 3) for w in layer_scales([1, 2], 4, "l")]
    [0.143, 0.286, 0.571]
    >>> [round(w, 3) for w in layer_scales([1, 2, 3], 4, "sum_l", [True, False, True])]
    [0.077, 0.0, 0.308, 0.615]
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    all_layers = [*layers, num_layers]
    active = [True] * len(all_layers) if active is None else [*active[: len(layers)], True]
    raw = [SCALES[scale](l) if on else 0.0 for l, on in zip(all_layers, active)]
    if scale == "sum_l":
        raw = [sum(raw[: i + 1]) if on else 0.0 for i, on in enumerate(active)]
    total = sum(raw)
    return [r / total for r in raw]


def active_layers(layers: list[int], num_layers: int, step: int, max_steps: int, curriculum: str = "none",
                  rotation: int = 2) -> list[int]:
    """The aux layers (1-based blocks ``< L``) whose heads are on at optimiser step ``step``; the
    final head is always on. torchtune's ``early_exit_loss`` curricula, as its recipe steps them
    (``step`` = number of optimiser steps done):

    * ``none``: ``layers``.
    * ``rotational`` (``RotationalEarlyExitCurriculum``): the per-block on/off mask over all ``L``
      blocks rolls by one block per step: block ``b`` is on iff ``((b - 1 - step) mod L) + 1 ∈
      layers``; a layer that rolls onto block ``L`` merges with the final head.
    * ``gradual`` (``GradualEarlyExitCurriculum``, ``fraction_scale`` 0.5): ``l ∈ layers`` is on iff
      ``(step - 1) / max_steps ≥ 0.5 · (L - l + 1) / L`` (deep layers first; torchtune computes the
      mask for step ``s`` from its step counter ``s - 1``, so nothing is on at steps 0 and 1).
    * ``round_robin`` (ours): the ``i``-th aux layer (0-based position in ``layers``) iff
      ``i ≡ step (mod rotation)``.

    >>> active_layers([1, 5], 8, step=3, max_steps=10, curriculum="rotational")
    [4]
    """
    L = num_layers
    if curriculum == "none":
        return list(layers)
    if curriculum == "rotational":
        return [b for b in range(1, L) if ((b - 1 - step) % L) + 1 in layers]
    if curriculum == "gradual":
        progress = (step - 1) / max(max_steps, 1)
        return [l for l in layers if progress >= 0.5 * (L - l + 1) / L]
    if curriculum == "round_robin":
        return [l for i, l in enumerate(layers) if i % rotation == step % rotation]
    raise ValueError(f"unknown curriculum {curriculum!r}; expected one of {CURRICULA}")


def curriculum_mask(layers: list[int], num_layers: int, step: int, max_steps: int, curriculum: str = "none",
                    rotation: int = 2) -> list[bool]:
    """:func:`active_layers` as one flag per configured aux layer (a rotational curriculum can
    also switch on blocks outside ``layers``: see :func:`step_weights`).

    >>> curriculum_mask([1, 2, 3], 4, step=1, max_steps=10, curriculum="round_robin")
    [False, True, False]
    """
    on = set(active_layers(layers, num_layers, step, max_steps, curriculum, rotation))
    return [l in on for l in layers]


def hooked_layers(options: DeCREDOptions, num_layers: int) -> list[int]:
    """Blocks whose outputs a step may need: every block ``< L`` under the rotational curriculum."""
    return list(range(1, num_layers)) if options.curriculum == "rotational" else list(options.layers)


def step_weights(options: DeCREDOptions, num_layers: int, step: int = 0, max_steps: int = 1) -> dict[int, float]:
    """``{layer: w}`` of every head at ``step``, the final head (``num_layers``) last: fixed
    ``options.weights`` (inactive heads zeroed, not renormalised) or :func:`layer_scales` over
    the active heads; layers off at this step are left out."""
    on = active_layers(options.layers, num_layers, step, max_steps, options.curriculum, options.rotation)
    if options.weights is not None:
        fixed = dict(zip([*options.layers, num_layers], options.weights))
        return {**{l: fixed[l] for l in on}, num_layers: fixed[num_layers]}
    weights = layer_scales(on, num_layers, options.scale)
    return dict(zip([*on, num_layers], weights))


def head_weights(options: DeCREDOptions, num_layers: int, step: int = 0, max_steps: int = 1) -> list[float]:
    """:func:`step_weights` as a list over the configured aux layers then the final head (0 for a
    head that is off)."""
    weights = step_weights(options, num_layers, step, max_steps)
    return [weights.get(l, 0.0) for l in [*options.layers, num_layers]]
