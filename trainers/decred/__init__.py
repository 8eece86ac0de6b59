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

Modules: :mod:`~trainers.decred.options` (options, head weights, curricula),
:mod:`~trainers.decred.losses` (the pure losses), :mod:`~trainers.decred.heads` (the heads, their
save and load), :mod:`~trainers.decred.regularizer` (hooks and the weighted loss),
:mod:`~trainers.decred.trainers` (the three trainers), :mod:`~trainers.decred.decode` (averaged
logits, held-out evaluation of the heads). Where a model keeps its decoder blocks, final norm and
LM head is :mod:`trainers.model_parts`. Everything public is importable from ``trainers.decred``.
"""

from .decode import INTERNAL_LM, averaged_logits, evaluate_heads
from .heads import (DeCREDHeads, attach_heads, from_pretrained_with_heads, heads_stripped, load_heads, options_of,
                    strip_heads)
from .losses import IGNORE, chunked_head_loss, ctc_loss, fused_heads_ce, label_smoothed_ce
from .options import (CURRICULA, SCALES, DeCREDOptions, active_layers, curriculum_mask, head_weights, hooked_layers,
                      layer_scales, step_weights)
from .regularizer import DeCREDRegularizer
from .trainers import DeCREDMixin, DeCREDRLIFTrainer, DeCREDSFTTrainer, DeCREDSeq2SeqTrainer, seq2seq_args

__all__ = [
    "CURRICULA",
    "DeCREDHeads",
    "DeCREDMixin",
    "DeCREDOptions",
    "DeCREDRLIFTrainer",
    "DeCREDRegularizer",
    "DeCREDSFTTrainer",
    "DeCREDSeq2SeqTrainer",
    "IGNORE",
    "INTERNAL_LM",
    "SCALES",
    "active_layers",
    "attach_heads",
    "averaged_logits",
    "chunked_head_loss",
    "ctc_loss",
    "curriculum_mask",
    "evaluate_heads",
    "from_pretrained_with_heads",
    "fused_heads_ce",
    "head_weights",
    "heads_stripped",
    "hooked_layers",
    "label_smoothed_ce",
    "layer_scales",
    "load_heads",
    "options_of",
    "seq2seq_args",
    "step_weights",
    "strip_heads",
]
