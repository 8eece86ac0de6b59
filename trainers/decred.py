"""DeCRED decoder regularisation: next-token heads on intermediate decoder layers.

DeCRED ("Decoder-Centric Regularization for Encoder-Decoder Based Speech Recognition") adds
next-token classifiers after chosen decoder blocks and trains them with the final head; the
decoder-only generalisation is LayerSkip's early-exit loss. With ``h_k`` the residual stream
after block ``k`` (``k = L`` is the final head's input) and ``y`` the labels aligned as the
model's own loss aligns them, the loss is::

    L = λ_ctc · L_CTC + (1 - λ_ctc) · Σ_k w_k · CE_ls(head_k(h_k), y)

* ``head_k``: a ``separate`` linear layer (DeCRED; initialised from the LM head or randomly)
  or the ``shared`` final norm + LM head (LayerSkip); the final norm on ``h_k`` is optional
  for separate heads (DeCRED's reference reads the raw residual stream).
* ``CE_ls(z, y) = (1 - ε)(-log p_y) + ε · mean_v(-log p_v)``, ``p = softmax(z)``: transformers'
  ``LabelSmoother``, averaged over the labelled tokens.
* ``w``: fixed weights (DeCRED: ``[0.3, 0.7]``, last = final head) or LayerSkip scales
  (:func:`layer_scales`), optionally switched on and off per step by a curriculum
  (:func:`curriculum_mask`).

Intermediate states come from forward hooks on the decoder blocks; every head projects only
the labelled tokens, ``chunk_size`` at a time, and computes its loss and gradients in the same
chunk loop (:func:`fused_heads_ce`; heads sharing the LM head in one call), so no ``(B, L, V)``
tensor of an auxiliary head (nor, for decoder-only models, of the final head) ever exists and
backward recomputes nothing. Heads that are not a plain linear layer on a whole local weight
(PEFT, ZeRO-3, FSDP2) use :func:`chunked_head_loss` (chunks under activation checkpointing). The heads
are a submodule (``model.decred_heads``) so optimisers, DDP and ``save_pretrained`` see them;
their layout is stored in ``model.config.decred`` and :func:`load_heads` restores them.

Trainers: :class:`DeCREDSFTTrainer` (decoder-only), :class:`DeCREDSeq2SeqTrainer`
(encoder-decoder, with an optional CTC head on the encoder for speech) and
:class:`DeCREDRLIFTrainer` (the auxiliary heads' loss added to the RLIF/GRPO loss).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import Seq2SeqTrainer
from trl import SFTTrainer

from .rlif import RLIFTrainer

SCALES: dict[str, Callable[[int], float]] = {
    "uniform": lambda l: 1.0,
    "l": lambda l: float(l),
    "sum_l": lambda l: float(l),  # summed cumulatively over the active heads in layer_scales
    "sqrt_l": lambda l: math.sqrt(l),
    "inv_l": lambda l: 1.0 / l,
    "inv_sqrt_l": lambda l: 1.0 / math.sqrt(l),
}
CURRICULA = ("none", "rotational", "gradual", "round_robin")
IGNORE = -100


# --------------------------------------------------------------------------------------------
# Options and weights (pure functions)
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Losses (pure functions)
# --------------------------------------------------------------------------------------------


def label_smoothed_ce(logits: torch.Tensor, labels: torch.Tensor, epsilon: float = 0.0) -> torch.Tensor:
    """Per-token ``(1 - ε)(-log p_y) + ε · mean_v(-log p_v)`` in float32; 0 where ``labels == -100``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != IGNORE
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - epsilon) * nll - epsilon * logp.mean(-1) if epsilon else nll
    return loss.masked_fill(~valid, 0.0)


def _chunk_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable, epsilon: float):
    logits = head(hidden)
    loss = label_smoothed_ce(logits, labels, epsilon).sum()
    correct = (logits.detach().argmax(-1) == labels).sum()
    return loss, correct


def chunked_head_loss(hidden: torch.Tensor, labels: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                      epsilon: float = 0.0, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ_t CE_ls(head(hidden_t), y_t)`` over labelled tokens, and the number of top-1 hits.

    ``hidden`` is ``(..., H)`` and ``labels`` ``(...)`` (``-100`` = ignored). Only labelled rows are
    projected, ``chunk_size`` at a time; with gradients on, each chunk runs under activation
    checkpointing, so at most one chunk's ``(chunk, V)`` logits are alive (the backward recomputes
    them, one chunk at a time).
    """
    mask = labels != IGNORE
    rows, targets = hidden[mask], labels[mask]
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.long, device=hidden.device)
    if rows.shape[0] == 0:
        return total + 0.0 * hidden.sum(), correct  # keep the graph connected
    grad = torch.is_grad_enabled()
    for start in range(0, rows.shape[0], chunk_size):
        h, y = rows[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            loss, hits = checkpoint(_chunk_loss, h, y, head, epsilon, use_reentrant=False)
        else:
            loss, hits = _chunk_loss(h, y, head, epsilon)
        total, correct = total + loss, correct + hits
    return total, correct


def _fused_heads_ce_pass(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, need_x, need_w, need_b):
    """The forward of :class:`_FusedHeadsCE`: per-head sums and hits, and, where asked, the
    gradients of ``Σ_k c_k Σ_t CE_ls`` w.r.t. each ``x_k``, the weight and the bias. The GEMMs run
    in the autocast dtype when autocast is on (else the inputs'), everything else in float32."""
    device = weight.device
    cd = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else xs[0].dtype
    with torch.autocast(device.type, enabled=False):
        return _fused_heads_ce_loop(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, need_x, need_w,
                                    need_b, cd)


def _fused_heads_ce_loop(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, need_x, need_w, need_b, cd):
    device = weight.device
    w = weight.to(cd)
    V = w.shape[0]
    dense = softcap is not None  # softcapped logits: build the whole logit gradient per chunk
    gw = torch.zeros(w.shape, device=device, dtype=torch.float32) if need_w else None
    gb = torch.zeros(V, device=device, dtype=torch.float32) if need_b else None
    x_total = torch.zeros(w.shape[1], device=device, dtype=torch.float32)  # Σ_k c_k Σ_t x_kt (ε term of gw)
    row_total = 0.0  # Σ_k c_k n_k (ε term of gb)
    w_sum = w.float().sum(0) if epsilon and not dense and any(need_x) else None  # Σ_v W_v (ε term of gx)
    b = bias.float() if bias is not None else None
    sums = torch.zeros(len(xs), device=device, dtype=torch.float32)
    hits = torch.zeros(len(xs), device=device, dtype=torch.long)
    grads_x = []
    for k, x in enumerate(xs):
        c = float(coefs[k])
        gx = torch.empty(x.shape, device=device, dtype=torch.float32) if need_x[k] else None
        for start in range(0, x.shape[0], chunk_size):
            xc, y = x[start : start + chunk_size].to(cd), targets[start : start + chunk_size]
            n = xc.shape[0]
            z = torch.mm(xc, w.t()).float()
            if b is not None:
                z += b
            if dense:
                t = torch.tanh(z / softcap)
                z = t * softcap
            zy = z.gather(1, y.unsqueeze(1)).squeeze(1)
            m = z.amax(1)
            top = zy == m  # a hit iff the label is the first maximum (argmax's tie rule)
            if bool(top.any()):
                rows = top.nonzero().squeeze(1)
                hits[k] += (z[rows].argmax(1) == y[rows]).sum()
            z_mean = z.mean(1) if epsilon else None
            e = z.sub_(m.unsqueeze(1)).exp_()  # in place: z is no longer needed
            s = e.sum(1)
            rows_loss = m + s.log() - (1.0 - epsilon) * zy
            if epsilon:
                rows_loss -= epsilon * z_mean
            sums[k] += rows_loss.sum()
            if not (need_x[k] or need_w or need_b):
                continue
            r = c / s  # row scale: c · softmax = (c / s) · e
            if dense:  # g = c (p - (1-ε) 1_y - ε/V), times d softcap(z)/dz = 1 - t²
                g = e.mul_(r.unsqueeze(1))
                if epsilon:
                    g -= c * epsilon / V
                g[torch.arange(n, device=device), y] -= c * (1.0 - epsilon)
                g *= 1.0 - t * t
                gc = g.to(cd)
                if gx is not None:
                    gx[start : start + n] = torch.mm(gc, w).float()
                if gw is not None:
                    gw += torch.mm(gc.t(), xc).float()
                if gb is not None:
                    gb += g.sum(0)
                continue
            # g = c·p - c(1-ε)·1_y - cε/V: the dense part is e scaled per row; the rest is sparse or rank one
            ec = e.to(cd)
            if gx is not None:
                part = torch.mm(ec, w).float().mul_(r.unsqueeze(1))
                part -= (c * (1.0 - epsilon)) * w[y].float()
                if epsilon:
                    part -= (c * epsilon / V) * w_sum
                gx[start : start + n] = part
            if gw is not None:
                xf = xc.float()
                scaled = (xf * r.unsqueeze(1)).to(cd)
                if cd == torch.float32:
                    gw.addmm_(ec.t(), scaled)
                else:
                    gw += torch.mm(ec.t(), scaled).float()
                gw.index_add_(0, y, xf, alpha=-c * (1.0 - epsilon))
                if epsilon:
                    x_total += c * xf.sum(0)
            if gb is not None:
                gb += torch.mv(e.t(), r)
                gb.index_add_(0, y, torch.full((n,), -c * (1.0 - epsilon), device=device))
                row_total += c * n
        grads_x.append(gx)
    if epsilon and not dense:
        if gw is not None:
            gw -= (epsilon / V) * x_total.unsqueeze(0)
        if gb is not None:
            gb -= epsilon * row_total / V
    total = (sums * torch.tensor(coefs, device=device, dtype=torch.float32)).sum()
    grads_x = [g.to(x.dtype) if g is not None else None for g, x in zip(grads_x, xs)]
    return total, sums, hits, grads_x, gw.to(weight.dtype) if gw is not None else None, \
        gb.to(bias.dtype) if gb is not None else None


class _FusedHeadsCE(torch.autograd.Function):
    """Loss and gradients of :func:`fused_heads_ce` in one pass over the chunks: the backward only
    scales the gradients the forward already computed (no recomputation of any projection)."""

    @staticmethod
    def forward(ctx, weight, bias, targets, coefs, epsilon, chunk_size, softcap, *xs):
        need = ctx.needs_input_grad
        total, sums, hits, gx, gw, gb = _fused_heads_ce_pass(
            xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap, list(need[7:]), need[0], need[1])
        ctx.grads = (gw, gb, gx)
        ctx.mark_non_differentiable(sums, hits)
        return total, sums, hits

    @staticmethod
    def backward(ctx, grad_total, *_):
        if ctx.grads is None:
            raise RuntimeError("fused_heads_ce: its gradients are computed in the forward; backward runs once")
        gw, gb, gx = ctx.grads
        ctx.grads = None
        if grad_total is None:
            return (None,) * (7 + len(gx))
        scale = [g.mul_(grad_total) if g is not None else None for g in (gw, gb, *gx)]
        return scale[0], scale[1], None, None, None, None, None, *scale[2:]


def fused_heads_ce(xs: list[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                   coefs: list[float], epsilon: float = 0.0, chunk_size: int = 1024, softcap: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heads that share one linear projection, each on its own rows ``x_k`` (``(N, H)``, labelled
    rows only) with the same ``targets`` (``(N,)``)::

        z_k = cap(x_k W^T + b),  cap(z) = s·tanh(z / s) (softcap s) or z
        total = Σ_k c_k Σ_t CE_ls(z_kt, y_t)

    Returns ``total`` (differentiable w.r.t. every ``x_k``, ``W`` and ``b``), each head's
    ``Σ_t CE_ls`` and its number of top-1 hits (both detached). Chunks of ``chunk_size`` rows; the
    gradients are computed in the same chunk loop as the loss, from ``∂CE_ls/∂z = p - (1-ε)·1_y -
    ε/V`` (``p`` never normalised as a matrix: ``p = e / Σe`` is folded into the GEMMs row-wise,
    the label and smoothing terms are a row gather and a rank-one update), so no ``(N, V)`` tensor
    outlives a chunk and backward recomputes nothing. The gradient of ``W`` (one per call, shared
    by its heads) is held from forward to backward.
    """
    if torch.is_grad_enabled() and (weight.requires_grad or any(x.requires_grad for x in xs)
                                     or (bias is not None and bias.requires_grad)):
        return _FusedHeadsCE.apply(weight, bias, targets, list(coefs), float(epsilon), int(chunk_size), softcap, *xs)
    total, sums, hits, *_ = _fused_heads_ce_pass(xs, weight, bias, targets, coefs, epsilon, chunk_size, softcap,
                                                 [False] * len(xs), False, False)
    return total, sums, hits


def ctc_loss(log_probs: torch.Tensor, output_lengths: torch.Tensor, labels: torch.Tensor, blank: int) -> torch.Tensor:
    """Mean over the batch of ``CTC(log_probs_b[:T_b], y_b) / |y_b|`` (``labels`` padded with -100;
    blank ids in the labels are dropped), as ``F.ctc_loss(reduction="mean")``."""
    valid = (labels != IGNORE) & (labels != blank)
    targets = labels[valid]
    target_lengths = valid.sum(-1)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(log_probs.float().transpose(0, 1), targets, output_lengths, target_lengths, blank=blank,
                          reduction="mean", zero_infinity=True)


# --------------------------------------------------------------------------------------------
# Where the decoder lives in a transformers model
# --------------------------------------------------------------------------------------------

_LAYER_PATHS = ("layers", "block", "h", "encoder.layer", "decoder.layers")
_NORM_PATHS = ("norm", "final_layer_norm", "ln_f", "layer_norm", "final_layernorm")


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def unwrap(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside DDP / PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") and hasattr(model, "peft_config") else model


@dataclass
class DecoderParts:
    """The modules a head needs: decoder blocks, final norm, LM head, and the model's logit transform."""

    model: nn.Module  # the top-level PreTrainedModel (owner of ``decred_heads``)
    layers: nn.ModuleList
    norm: nn.Module | None
    lm_head: nn.Module
    backbone: nn.Module | None  # decoder-only: module whose output.last_hidden_state feeds lm_head
    encoder: nn.Module | None
    encoder_decoder: bool
    pre_scale: float = 1.0  # T5 scales decoder outputs by d_model**-0.5 before its LM head
    logits_bias: torch.Tensor | None = None  # BART's final_logits_bias
    softcap: float | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return _full_shape(self.lm_head.weight)[1]

    @property
    def vocab_size(self) -> int:
        return _full_shape(self.lm_head.weight)[0]

    def final_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's own LM head on its final (already normed) hidden state."""
        logits = self.lm_head(hidden * self.pre_scale if self.pre_scale != 1.0 else hidden)
        if self.logits_bias is not None:
            logits = logits + self.logits_bias.to(logits.dtype)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also when ZeRO-3 holds only this rank's partition of it."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate decoder blocks, final norm and LM head of a decoder-only or encoder-decoder model
    (Llama/Qwen/GPT-2/BERT-decoder families, T5, BART, ``SpeechEncoderDecoderModel``)."""
    top = unwrap(model)
    config = top.config
    lm_head = top.get_output_embeddings()
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise ValueError(f"{type(top).__name__}: no linear LM head to attach decoder heads to")
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    encoder = top.get_encoder() if encoder_decoder else None
    pre_scale, bias, backbone = 1.0, None, None
    if encoder_decoder:
        decoder = getattr(top, "decoder", None)
        decoder = top.get_decoder() if decoder is None else decoder
        if hasattr(decoder, "get_output_embeddings") and decoder.get_output_embeddings() is not None:
            decoder = decoder.base_model  # SpeechEncoderDecoderModel / EncoderDecoderModel: a causal-LM decoder
        if getattr(config, "scale_decoder_outputs", False) or (
            getattr(config, "model_type", "") == "t5" and getattr(config, "tie_word_embeddings", False)):
            pre_scale = config.d_model**-0.5
        bias = getattr(top, "final_logits_bias", None)
    else:
        decoder = backbone = top.base_model
    layers = next((m for p in _LAYER_PATHS if isinstance(m := _get(decoder, p), nn.ModuleList)), None)
    if layers is None:
        raise ValueError(f"{type(top).__name__}: cannot find the decoder blocks (looked for {_LAYER_PATHS})")
    norm = next((m for p in _NORM_PATHS if isinstance(m := _get(decoder, p), nn.Module)), None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return DecoderParts(top, layers, norm, lm_head, backbone, encoder, encoder_decoder, pre_scale, bias,
                        getattr(text, "final_logit_softcapping", None))


# --------------------------------------------------------------------------------------------
# The heads (saved with the model)
# --------------------------------------------------------------------------------------------


class DeCREDHeads(nn.Module):
    """Separate auxiliary next-token heads (``heads[str(l)]``) and an optional CTC head."""

    def __init__(self, layers: list[int], hidden_size: int, vocab_size: int, separate: bool = True, bias: bool = False,
                 ctc_dim: int | None = None, ctc_vocab: int | None = None):
        super().__init__()
        self.spec = {"layers": list(layers), "hidden_size": hidden_size, "vocab_size": vocab_size,
                     "separate": separate, "bias": bias, "ctc_dim": ctc_dim, "ctc_vocab": ctc_vocab}
        self.heads = nn.ModuleDict({str(l): nn.Linear(hidden_size, vocab_size, bias=bias) for l in layers} if separate else {})
        self.ctc = nn.Linear(ctc_dim, ctc_vocab) if ctc_dim else None


def attach_heads(model: nn.Module, options: DeCREDOptions) -> DeCREDHeads:
    """Create ``model.decred_heads`` (initialised per ``options.init``) and record the layout in
    ``model.config.decred`` so that :func:`load_heads` can rebuild it after ``from_pretrained``."""
    parts = decoder_parts(model)
    options.check_depth(parts.num_layers)
    top = parts.model
    ctc_dim = parts.encoder.config.hidden_size if options.ctc_weight > 0 and parts.encoder is not None else None
    if options.ctc_weight > 0 and ctc_dim is None:
        raise ValueError("decred.ctc_weight > 0 needs an encoder-decoder model (the CTC head reads the encoder)")
    lm = parts.lm_head
    heads = DeCREDHeads(options.layers, parts.hidden_size, parts.vocab_size, options.head == "separate",
                        bias=getattr(lm, "bias", None) is not None, ctc_dim=ctc_dim,
                        ctc_vocab=parts.vocab_size if ctc_dim else None)
    heads.to(device=lm.weight.device, dtype=lm.weight.dtype)
    with torch.no_grad():  # new Linear layers as transformers initialises them: N(0, initializer_range), zero bias
        text = top.config.get_text_config(decoder=True) if hasattr(top.config, "get_text_config") else top.config
        new = [(h, getattr(text, "initializer_range", 0.02)) for h in heads.heads.values()] if options.init == "random" else []
        if heads.ctc is not None:
            new.append((heads.ctc, getattr(parts.encoder.config, "initializer_range", 0.02)))
        for linear, std in new:
            linear.weight.normal_(0.0, std)
            if linear.bias is not None:
                linear.bias.zero_()
    if options.init == "lm_head":
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        with torch.no_grad(), maybe_gather_lm_head_ctx(lm.weight, getattr(lm, "bias", None)):
            for head in heads.heads.values():
                head.weight.copy_(lm.weight * parts.pre_scale)  # fold T5's output scaling into the copy
                if head.bias is not None:
                    head.bias.copy_(lm.bias)
    top.decred_heads = heads
    top.config.decred = {**heads.spec, "options": asdict(options)}
    return heads


def strip_heads(model: nn.Module) -> DeCREDHeads | None:
    """Remove the heads and their config entry (for export); returns them."""
    top = unwrap(model)
    heads = top._modules.pop("decred_heads", None)
    if hasattr(top.config, "decred"):
        del top.config.decred
    return heads


@contextlib.contextmanager
def heads_stripped(model: nn.Module):
    """Temporarily remove the heads (e.g. to save an export without them)."""
    top = unwrap(model)
    spec = getattr(top.config, "decred", None)
    heads = strip_heads(top)
    try:
        yield top
    finally:
        if heads is not None:
            top.decred_heads = heads
            top.config.decred = spec


def _checkpoint_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        if (path / name).exists():
            out.update({k[len(prefix):]: v for k, v in load_file(str(path / name)).items() if k.startswith(prefix)})
    return out


def load_heads(model: nn.Module, path: str | os.PathLike) -> DeCREDHeads | None:
    """Rebuild ``model.decred_heads`` from ``model.config.decred`` and load its weights from the
    checkpoint directory ``path`` (``from_pretrained`` drops them as unexpected keys)."""
    top = unwrap(model)
    spec = getattr(top.config, "decred", None)
    if not spec:
        return None
    opts = {k: v for k, v in spec.items() if k != "options"}
    heads = DeCREDHeads(**opts)
    state = _checkpoint_tensors(Path(path), "decred_heads.")
    missing, _ = heads.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks decred head weights {missing}")
    lm = top.get_output_embeddings()
    top.decred_heads = heads.to(device=lm.weight.device, dtype=lm.weight.dtype)
    return heads


def from_pretrained_with_heads(path: str | os.PathLike, auto_class=None, **kwargs):
    """``from_pretrained`` plus :func:`load_heads`: the model as it was trained, heads included."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if auto_class is None:
        config = AutoConfig.from_pretrained(path)
        auto_class = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto_class.from_pretrained(path, **kwargs)
    load_heads(model, path)
    return model


def options_of(model: nn.Module) -> DeCREDOptions | None:
    spec = getattr(unwrap(model).config, "decred", None)
    return DeCREDOptions(**spec["options"]) if spec and "options" in spec else None


# --------------------------------------------------------------------------------------------
# The regulariser: hooks, head functions, the weighted loss
# --------------------------------------------------------------------------------------------


def _sharded(obj) -> bool:
    """A ZeRO-3 partitioned parameter, an FSDP2 ``DTensor``, or a module under FSDP."""
    from torch.distributed.tensor import DTensor

    if isinstance(obj, nn.Module):
        return type(obj).__name__.startswith("FSDP") or hasattr(obj, "_fsdp_wrapped_module")
    return isinstance(obj, DTensor) or hasattr(obj, "ds_id")


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


class DeCREDRegularizer:
    """Captures the decoder states of the chosen layers (and, when needed, the final and encoder
    states) during an armed forward, and turns them into the per-head losses."""

    def __init__(self, model: nn.Module, options: DeCREDOptions):
        self.options = options
        self.parts = decoder_parts(model)
        options.check_depth(self.parts.num_layers)
        if getattr(self.parts.model, "decred_heads", None) is None:
            attach_heads(self.parts.model, options)
        self.states: dict | None = None
        self._inside: Callable | None = None
        self._handles = [self.parts.layers[l - 1].register_forward_hook(self._hook(l))
                         for l in hooked_layers(options, self.parts.num_layers)]
        self._handles.append(self.parts.model.register_forward_hook(self._top_hook))
        if self.parts.backbone is not None:
            self._handles.append(self.parts.backbone.register_forward_hook(self._hook("final")))
        if self.heads.ctc is not None:
            self._handles.append(self.parts.encoder.register_forward_hook(self._hook("encoder")))

    @property
    def heads(self) -> DeCREDHeads:
        return self.parts.model.decred_heads

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, key):
        def hook(module, args, output):
            if self.states is not None:
                value = output.last_hidden_state if key in ("final", "encoder") and hasattr(output, "last_hidden_state") else _first(output)
                self.states.setdefault(key, []).append(value)
        return hook

    @contextlib.contextmanager
    def capture(self, inside: Callable | None = None):
        """Arm the hooks for one forward (or several: states are concatenated along the batch).

        ``inside(output) -> (loss, info)`` runs in a forward hook of the top-level model, i.e.
        within the forward of any wrapper (DDP, DeepSpeed), once the states are captured; its loss
        is also put in the model's output (``loss``) so that DDP's unused-parameter search
        reaches the heads. Its return value is left in ``self.result``.
        """
        self.states, self._inside, self.result = {}, inside, None
        try:
            yield self
        finally:
            self._collect()
            self.states, self._inside = None, None

    def _collect(self) -> None:
        self.captured = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in (self.states or {}).items()}

    def _top_hook(self, module, args, output):
        if self._inside is None or self.states is None:
            return
        inside, self._inside = self._inside, None  # once per armed forward
        self._collect()
        self.result = inside(output)
        ours = self.result[0]
        if isinstance(output, dict) and torch.is_tensor(ours) and ours.requires_grad:
            # DDP rebuilds ModelOutputs from their fields, so the loss rides on ``loss``: ours when
            # the model computed none, else the model's own plus 0·ours (value unchanged)
            own = output.get("loss")
            output["loss"] = ours if own is None else own + 0.0 * ours

    def head_fn(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        """``hidden -> logits`` of the aux head at ``layer`` (``num_layers``: the final head)."""
        parts, opts = self.parts, self.options
        if layer == parts.num_layers:
            return parts.final_logits
        if opts.head == "shared":
            return lambda h: parts.final_logits(parts.norm(h) if parts.norm is not None else h)
        linear = self.heads.heads[str(layer)]
        if opts.final_norm and parts.norm is not None:
            return lambda h: linear(parts.norm(h))
        return linear

    def head_losses(self, labels: torch.Tensor, shift: bool, final_logits: torch.Tensor | None = None,
                    layers: list[int] | None = None, epsilon: float | None = None) -> dict[int, tuple]:
        """``{layer: (Σ_t CE_ls, hits)}`` over the labelled tokens of the captured states, for
        ``layers`` (default: every aux layer plus the final one). ``shift``: position ``t``
        predicts ``labels[t + 1]`` (causal LM); otherwise ``labels[t]`` (seq2seq decoder).
        ``final_logits`` (the model's own, full) stand in for the final head when given."""
        eps = self.options.label_smoothing if epsilon is None else epsilon
        targets = labels[:, 1:] if shift else labels
        layers = [*self.options.layers, self.num_layers] if layers is None else layers
        out = {}
        for layer in layers:
            if layer == self.num_layers and final_logits is not None:
                logits = final_logits[:, :-1] if shift else final_logits
                per_token = label_smoothed_ce(logits, targets, eps)
                hits = (logits.detach().argmax(-1) == targets).sum()
                out[layer] = (per_token.sum(), hits)
                continue
            hidden = self.captured["final" if layer == self.num_layers else layer]
            hidden = hidden[:, :-1] if shift else hidden
            if self.options.detach and layer != self.num_layers:
                hidden = hidden.detach()
            out[layer] = chunked_head_loss(hidden, targets, self.head_fn(layer), eps, self.options.chunk_size)
        return out

    def _projection(self, layer: int) -> tuple | None:
        """``(key, prep, weight, bias, softcap)`` with ``head_fn(layer)(h) == cap(prep(h) W^T + b)``,
        ``prep`` row-wise (norm, T5's output scale; ``None``: identity), or ``None`` when the head
        is not a plain ``nn.Linear`` on a whole local weight (PEFT/quantised layers, ZeRO-3 or FSDP2
        shards): those go through :func:`chunked_head_loss`. Heads with the same ``key`` share
        ``W`` and ``b`` (the final head and LayerSkip's shared heads)."""
        parts, opts = self.parts, self.options
        shared = layer == parts.num_layers or opts.head == "shared"
        linear = parts.lm_head if shared else self.heads.heads[str(layer)]
        weight = linear.weight
        if type(linear) is not nn.Linear or _sharded(weight) or _sharded(parts.model):
            return None
        norm = parts.norm if layer != parts.num_layers and (shared or opts.final_norm) else None
        scale = parts.pre_scale if shared else 1.0
        if norm is None and scale == 1.0:
            prep = None
        elif norm is None:
            prep = lambda h: h * scale  # noqa: E731
        else:
            prep = (lambda h: norm(h) * scale) if scale != 1.0 else norm
        if not shared:
            return (("head", layer), prep, weight, linear.bias, None)
        bias = linear.bias
        if parts.logits_bias is not None:
            extra = parts.logits_bias.reshape(-1).to(weight.dtype)
            bias = extra if bias is None else bias + extra
        return (("lm_head",), prep, weight, bias, parts.softcap or None)

    def weighted_losses(self, labels: torch.Tensor, shift: bool, weights: dict[int, float],
                        final_logits: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, tuple]]:
        """``Σ_k w_k Σ_t CE_ls(head_k(h_k), y_t)`` over ``weights`` (``{layer: w_k}``), and each
        head's ``(Σ_t CE_ls, hits)``: the same sums as :meth:`head_losses`, computed by
        :func:`fused_heads_ce` for linear heads (one pass per projection, the label gather and
        row selection shared; heads sharing the LM head in one call, so one gradient of ``W``).
        ``final_logits`` (the model's own) stand in for the final head when given."""
        eps = self.options.label_smoothing
        targets = labels[:, 1:] if shift else labels
        mask = targets != IGNORE
        y = targets[mask]
        total = labels.new_zeros((), dtype=torch.float32)
        out: dict[int, tuple] = {}
        groups: dict[tuple, list] = {}
        for layer, w in weights.items():
            if layer == self.num_layers and final_logits is not None:
                logits = final_logits[:, :-1] if shift else final_logits
                per_token = label_smoothed_ce(logits, targets, eps)
                out[layer] = (per_token.sum(), (logits.detach().argmax(-1) == targets).sum())
                total = total + w * out[layer][0]
                continue
            hidden = self.captured["final" if layer == self.num_layers else layer]
            hidden = hidden[:, :-1] if shift else hidden
            if self.options.detach and layer != self.num_layers:
                hidden = hidden.detach()
            spec = self._projection(layer)
            if spec is None:
                out[layer] = chunked_head_loss(hidden, targets, self.head_fn(layer), eps, self.options.chunk_size)
                total = total + w * out[layer][0]
                continue
            key, prep, weight, bias, softcap = spec
            rows = hidden[mask]
            group = groups.setdefault(key, [weight, bias, softcap, [], [], []])
            group[3].append(layer)
            group[4].append(prep(rows) if prep is not None else rows)
            group[5].append(w)
        for weight, bias, softcap, layers, xs, coefs in groups.values():
            part, sums, hits = fused_heads_ce(xs, weight, bias, y, coefs, eps, self.options.chunk_size, softcap)
            total = total + part
            for i, layer in enumerate(layers):
                out[layer] = (sums[i], hits[i])
        return total, out

    def weights(self, step: int, max_steps: int) -> dict[int, float]:
        w = step_weights(self.options, self.num_layers, step, max_steps)
        if self.options.detach:  # probes: the model sees plain fine-tuning
            w = {l: (1.0 if self.options.weights is None else v) for l, v in w.items()}
            w[self.num_layers] = 1.0
        return w

    def ctc(self, labels: torch.Tensor, input_lengths: torch.Tensor | None, blank: int) -> torch.Tensor:
        """CTC loss of the CTC head on the captured encoder states."""
        states = self.captured["encoder"]
        log_probs = torch.log_softmax(self.heads.ctc(states).float(), dim=-1)
        frames = states.shape[1]
        encoder = self.parts.encoder
        if input_lengths is not None and hasattr(encoder, "_get_feat_extract_output_lengths"):
            lengths = encoder._get_feat_extract_output_lengths(input_lengths).clamp(max=frames)
        else:
            lengths = torch.full((states.shape[0],), frames, device=states.device)
        return ctc_loss(log_probs, lengths.long(), labels, blank)


# --------------------------------------------------------------------------------------------
# Trainers
# --------------------------------------------------------------------------------------------


class DeCREDMixin:
    """Trainer mixin: ``decred=DeCREDOptions`` keyword; builds the heads and the regulariser,
    logs ``decred/loss_<layer>`` and ``decred/acc_<layer>``, strips heads on export if asked."""

    def __init__(self, *args, decred: DeCREDOptions | None = None, **kwargs):
        self.decred_options = decred or DeCREDOptions()
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module) and not hasattr(model, "peft_config"):
            self.decred = DeCREDRegularizer(model, self.decred_options)  # before PEFT wraps it
        super().__init__(*args, **kwargs)
        if not hasattr(self, "decred"):
            self.decred = DeCREDRegularizer(self.model, self.decred_options)
        for p in self.decred.heads.parameters():  # PEFT freezes everything else
            p.requires_grad_(True)
        self._decred_logs: dict[str, list[float]] = defaultdict(list)

    def _decred_log(self, losses: dict[int, tuple], count: torch.Tensor, extra: dict[str, torch.Tensor] | None = None) -> None:
        prefix = "" if self.model.training else "eval_"
        n = count.clamp(min=1)
        for layer, (total, hits) in losses.items():
            name = "final" if layer == self.decred.num_layers else f"l{layer}"
            self._decred_logs[f"{prefix}decred/loss_{name}"].append(total.detach() / n)
            self._decred_logs[f"{prefix}decred/acc_{name}"].append(hits / n)
        for key, value in (extra or {}).items():
            self._decred_logs[f"{prefix}decred/{key}"].append(value.detach())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        eval_logs = any(k.startswith("eval_") for k in logs)
        for key in [k for k in self._decred_logs if k.startswith("eval_") == eval_logs]:
            values = self._decred_logs.pop(key)  # tensors: one device sync per logging step, this rank's mean
            logs[key] = torch.stack([v.float() for v in values]).mean().item()
        super().log(logs, *args, **kwargs)

    def _decred_step(self) -> tuple[int, int]:
        state = getattr(self, "state", None)
        return (state.global_step, state.max_steps) if state is not None else (0, 1)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call or self.decred_options.export_heads:
            return super().save_model(output_dir, _internal_call)
        with heads_stripped(self.model):
            return super().save_model(output_dir, _internal_call)

    def _decred_losses(self, labels: torch.Tensor, shift: bool, final_logits: torch.Tensor | None = None,
                       final: bool = True) -> tuple[torch.Tensor, dict[int, tuple]]:
        """``Σ_k w_k Σ_t CE_ls`` over the heads with a non-zero weight at this step (the final
        head too when ``final``), and each head's ``(sum, hits)``."""
        step, max_steps = self._decred_step()
        weights = self.decred.weights(step, max_steps)
        if not final:
            weights.pop(self.decred.num_layers)
        return self.decred.weighted_losses(labels, shift, {l: w for l, w in weights.items() if w}, final_logits)


def _forward_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k != "labels"}


def _logits_to_keep_supported(model: nn.Module) -> bool:
    import inspect

    return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters


class DeCREDSFTTrainer(DeCREDMixin, SFTTrainer):
    """``SFTTrainer`` with DeCRED/LayerSkip auxiliary heads on a decoder-only model.

    One forward of the backbone (the LM head runs on a single position only); every head,
    the final one included, is projected chunked from the captured states.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = True  # our loss is normalised by num_items_in_batch
        self._keep = _logits_to_keep_supported(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        kwargs = {**_forward_inputs(inputs), "use_cache": False}
        if self._keep:
            kwargs["logits_to_keep"] = 1
        with self.decred.capture(lambda output: self._decred_losses(labels, shift=True)):
            outputs = model(**kwargs)
        total, losses = self.decred.result
        local = (labels[:, 1:] != IGNORE).sum()
        count = num_items_in_batch if num_items_in_batch is not None else local
        loss = total / torch.as_tensor(count, device=labels.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        self._decred_log(losses, local)
        return (loss, outputs) if return_outputs else loss


class DeCREDSeq2SeqTrainer(DeCREDMixin, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` with DeCRED heads on the decoder of an encoder-decoder model (text
    seq2seq or ``SpeechEncoderDecoderModel``), and the hybrid CTC loss when ``ctc_weight > 0``:
    ``λ L_CTC + (1 - λ) Σ_k w_k CE_ls``. Labels are not shifted (``decoder_input_ids`` are the
    right-shifted labels, as the model builds them)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # per-micro-batch mean; Trainer scales for accumulation
        self.label_smoother = None
        config = unwrap(self.model).config
        text = config.get_text_config(decoder=True)
        self._blank = self.decred_options.ctc_blank
        if self._blank is None:
            self._blank = next((i for i in (config.pad_token_id, getattr(text, "pad_token_id", None)) if i is not None), 0)
        # CTC targets are the transcript tokens: EOS/BOS are not emitted frames
        self._not_ctc = [i for i in {getattr(text, "eos_token_id", None), getattr(text, "bos_token_id", None)}
                         if isinstance(i, int)]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        kwargs = _forward_inputs(inputs)
        if "decoder_input_ids" not in kwargs:
            kwargs["decoder_input_ids"] = unwrap(model).prepare_decoder_input_ids_from_labels(labels=labels)
        count = (labels != IGNORE).sum()
        mask = inputs.get("attention_mask")

        def inside(output):
            total, losses = self._decred_losses(labels, shift=False, final_logits=output.logits)
            loss, extra = total / count.clamp(min=1), {}
            if self.decred_options.ctc_weight > 0:
                targets = labels.clone()
                for token in self._not_ctc:
                    targets[targets == token] = IGNORE
                ctc = self.decred.ctc(targets, mask.sum(-1) if mask is not None else None, self._blank)
                lam = self.decred_options.ctc_weight
                loss, extra["ctc"] = lam * ctc + (1 - lam) * loss, ctc.detach()
            return loss, (losses, extra)

        with self.decred.capture(inside):
            outputs = model(**kwargs, use_cache=False)
        loss, (losses, extra) = self.decred.result
        self._decred_log(losses, count, extra)
        return (loss, outputs) if return_outputs else loss


class DeCREDRLIFTrainer(DeCREDMixin, RLIFTrainer):
    """``RLIFTrainer`` whose loss gains the auxiliary heads' term on the completion tokens::

        L = L_GRPO + Σ_{k aux} w_k · mean_t CE_ls(head_k(h_k), completion_t)

    The states come from the policy's own grad-enabled pass inside TRL's loss (no extra forward).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.decred_options.layers:
            raise ValueError("DeCREDRLIFTrainer needs at least one aux layer (decred.layers)")

    def _compute_loss(self, model, inputs):
        completion = inputs["completion_ids"]
        mask = inputs["completion_mask"] if "tool_mask" not in inputs else inputs["completion_mask"] * inputs["tool_mask"]
        labels = torch.cat([torch.full_like(inputs["prompt_ids"], IGNORE), completion.masked_fill(mask == 0, IGNORE)], 1)
        with self.decred.capture(lambda output: self._decred_losses(labels, shift=True, final=False)):
            loss = super()._compute_loss(model, inputs)
        total, losses = self.decred.result
        count = (labels != IGNORE).sum()
        aux = total / count.clamp(min=1)
        if self.model.training:
            aux = aux / self.current_gradient_accumulation_steps
        self._decred_log(losses, count, {"aux_loss": aux * (self.current_gradient_accumulation_steps if self.model.training else 1)})
        return loss + aux


def seq2seq_args(args):
    """``Seq2SeqTrainingArguments`` carrying every field ``args`` (any ``TrainingArguments``) sets."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    names = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init}
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init and f.name in names}
    return Seq2SeqTrainingArguments(**values)


# --------------------------------------------------------------------------------------------
# Decode time and analysis
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def averaged_logits(model: nn.Module, weights: list[float], options: DeCREDOptions | None = None):
    """Inside the block, the model's logits are ``Σ_k w_k z^k`` over the aux heads then the final
    head (``weights`` in that order), on every forward, ``generate`` included::

        with averaged_logits(model, [0.3, 0.7]):
            ids = model.generate(**batch)

    A hook on the LM head adds the aux heads' logits of the positions the LM head sees.
    """
    options = options or options_of(model)
    if options is None:
        raise ValueError("averaged_logits: the model has no decred heads (attach_heads or load_heads first)")
    if len(weights) != len(options.layers) + 1:
        raise ValueError(f"averaged_logits needs {len(options.layers) + 1} weights, got {len(weights)}")
    reg = DeCREDRegularizer(model, options)
    lm_head = reg.parts.lm_head

    def mix(module, args, output):
        if reg.states is None:
            return output
        n = output.shape[-2]
        total = weights[-1] * output
        for w, layer in zip(weights, options.layers):
            if w:
                hidden = reg.states[layer][-1][..., -n:, :]
                total = total + w * reg.head_fn(layer)(hidden).to(output.dtype)
        reg.states = {}
        return total

    def arm(module, args, kwargs):
        reg.states = {}

    top = reg.parts.model
    handles = [top.register_forward_pre_hook(arm, with_kwargs=True), lm_head.register_forward_hook(mix)]
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        reg.remove()


INTERNAL_LM = ("reference", "zero_state")


def _decoder_alone_logits(parts: DecoderParts, decoder_input_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the decoder stack run on its own: no encoder states are passed, so every
    cross-attention block is skipped (GPT-2, T5, BART and BERT decoder layers run their
    cross-attention only when ``encoder_hidden_states`` is given), the model's own LM head on top."""
    decoder = parts.model.get_decoder()
    out = decoder(input_ids=decoder_input_ids, use_cache=False)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else parts.final_logits(out.last_hidden_state)


def _per_row_totals(reg: "DeCREDRegularizer", labels: torch.Tensor, final_logits: torch.Tensor) -> list[dict[int, float]]:
    """``[{layer: Σ_t CE(row b)}]``: :meth:`DeCREDRegularizer.head_losses` with every other row's
    labels masked (the chunked projection only reads labelled rows, so each row costs its own tokens)."""
    rows = []
    for b in range(labels.shape[0]):
        masked = torch.full_like(labels, IGNORE)
        masked[b] = labels[b]
        losses = reg.head_losses(masked, shift=False, final_logits=final_logits, epsilon=0.0)
        rows.append({layer: float(total) for layer, (total, _) in losses.items()})
    return rows


@torch.no_grad()
def evaluate_heads(model: nn.Module, batches, options: DeCREDOptions | None = None, internal_lm: bool | str = False
                   ) -> dict[str, float]:
    """Held-out loss (plain CE, no smoothing) and perplexity of every head over ``batches``
    (dicts of model inputs with ``labels``): ``loss_k = Σ_t CE / N`` over all labelled tokens,
    ``ppl_k = exp(loss_k)``.

    ``internal_lm`` (encoder-decoder only) evaluates the decoder as a language model on the
    same targets (``decoder_input_ids`` = the right-shifted labels):

    * ``True`` / ``"reference"`` (DeCRED's ``compute_ilm_ppl``): the decoder stack runs without
      encoder states, so cross-attention is skipped, not fed zeros; ``ppl_k`` is the mean over
      utterances ``u`` of ``exp(Σ_{t∈u} CE / |u|)``; ``loss_k`` stays the token mean.
    * ``"zero_state"``: the whole model with one all-zero encoder state (cross-attention still
      adds its constant output); ``ppl_k = exp(loss_k)`` as above.
    """
    from transformers.modeling_outputs import BaseModelOutput

    mode = "reference" if internal_lm is True else (internal_lm or None)
    if mode is not None and mode not in INTERNAL_LM:
        raise ValueError(f"internal_lm must be False, True or one of {INTERNAL_LM}, got {internal_lm!r}")
    options = options or options_of(model)
    if options is None:
        raise ValueError("evaluate_heads: the model has no decred heads")
    reg = DeCREDRegularizer(model, options)
    parts = reg.parts
    if mode is not None and not parts.encoder_decoder:
        reg.remove()
        raise ValueError("internal-LM evaluation needs an encoder-decoder model")
    was_training = parts.model.training
    parts.model.eval()
    sums: dict[int, float] = defaultdict(float)
    utterance_ppl: dict[int, list[float]] = defaultdict(list)
    count = 0
    try:
        for batch in batches:
            labels = batch["labels"]
            kwargs = _forward_inputs(batch)
            if parts.encoder_decoder:
                kwargs.setdefault("decoder_input_ids", parts.model.prepare_decoder_input_ids_from_labels(labels=labels))
            if mode == "reference":
                with reg.capture():
                    logits = _decoder_alone_logits(parts, kwargs["decoder_input_ids"])
                for row, totals in zip(labels, _per_row_totals(reg, labels, logits)):
                    n = max(int((row != IGNORE).sum()), 1)
                    for layer, total in totals.items():
                        sums[layer] += total
                        utterance_ppl[layer].append(math.exp(min(total / n, 50.0)))
                count += int((labels != IGNORE).sum())
                continue
            if mode == "zero_state":
                zeros = torch.zeros(labels.shape[0], 1, parts.encoder.config.hidden_size,
                                    device=labels.device, dtype=parts.lm_head.weight.dtype)
                kwargs = {"encoder_outputs": BaseModelOutput(last_hidden_state=zeros),
                          "decoder_input_ids": kwargs["decoder_input_ids"]}
            with reg.capture():
                out = parts.model(**kwargs, use_cache=False)
            losses = reg.head_losses(labels, shift=not parts.encoder_decoder,
                                     final_logits=out.logits if parts.encoder_decoder else None, epsilon=0.0)
            for layer, (total, _) in losses.items():
                sums[layer] += float(total)
            count += int(((labels[:, 1:] if not parts.encoder_decoder else labels) != IGNORE).sum())
    finally:
        reg.remove()
        parts.model.train(was_training)
    report = {}
    for layer, total in sums.items():
        name = "final" if layer == parts.num_layers else f"l{layer}"
        report[f"loss_{name}"] = total / max(count, 1)
        report[f"ppl_{name}"] = (sum(utterance_ppl[layer]) / len(utterance_ppl[layer]) if mode == "reference"
                                 else math.exp(min(total / max(count, 1), 50.0)))
    return report
