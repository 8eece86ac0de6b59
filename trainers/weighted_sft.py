"""SFT with one weight per example: TRL's ``SFTTrainer`` whose loss multiplies each sequence's NLL.

Self-improvement reweights its own samples (verifier scores as weights) instead of filtering
them. :class:`WeightedSFTTrainer` reads a ``weight`` column of the training dataset (kept
through TRL's preparation and collation) and turns TRL's token-summed loss into the weighted
one with :func:`weighted_sequence_loss`; without a ``weight`` column it is TRL's ``SFTTrainer``.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

WEIGHT = "weight"


def weighted_sequence_loss(loss: torch.Tensor, token_logps: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Reweight a token-summed NLL per sequence, keeping the trainer's own normalisation.

    TRL's SFT loss is ``loss = c * sum_i L_i`` with ``L_i = -sum_t log p(y_it)`` (zero on ignored
    positions) and ``c`` its normaliser (``1 / num_items_in_batch``, times the process count when
    tokens are averaged across devices). This returns

        ``c * sum_i w_i L_i``   with ``c = loss / sum_i L_i`` (a constant: no gradient through it),

    so all-ones weights give TRL's loss back, and the gradient is ``c * sum_i w_i grad L_i``.

    Args:
        loss: TRL's scalar loss for the batch.
        token_logps: ``(B, T)`` per-token log-probs (zero where ignored), with gradient.
        weights: ``(B,)`` non-negative per-sequence weights.

    >>> logps = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]])
    >>> weighted_sequence_loss(torch.tensor(4.0 / 3), logps, torch.tensor([1.0, 0.0]))  # c = 1/3, L = (2, 2)
    tensor(0.6667)
    """
    per_sequence = -token_logps.sum(-1)
    total = per_sequence.detach().sum()
    scale = torch.where(total > 0, loss.detach() / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
    return scale * (weights.to(per_sequence.dtype) * per_sequence).sum()


class _WeightCollator:
    """Wraps TRL's collator: pops every example's ``weight`` and adds them as a ``(B,)`` tensor."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list[dict]) -> dict:
        weights = [float(example.pop(WEIGHT)) for example in examples] if WEIGHT in examples[0] else None
        batch = self.collator(examples)
        if weights is not None:
            batch[WEIGHT] = torch.tensor(weights, dtype=torch.float32)
        return batch


class WeightedSFTTrainer(SFTTrainer):
    """``SFTTrainer`` with per-example loss weights from the dataset's ``weight`` column.

    The weighted loss reads the per-token log-probs of TRL's own fused forward (captured with a
    forward hook during ``super().compute_loss``), so no logits are built and no pass is added.
    Padding-free batching and packing mix sequences within a row, so they are refused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.packing or self.args.padding_free:
            raise ValueError("WeightedSFTTrainer: per-example weights need one sequence per row (no packing/padding_free)")
        if self.aux_loss_enabled:
            raise ValueError("WeightedSFTTrainer: the MoE auxiliary loss would be rescaled too; disable it")
        self.data_collator = _WeightCollator(self.data_collator)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if WEIGHT not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, WEIGHT]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHT, None)
        if weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        captured = []
        handle = model.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
        finally:
            handle.remove()
        fused = next((o for o in captured if getattr(o, "log_probs", None) is not None), None)
        if fused is None or fused.log_probs.shape[0] != weights.shape[0]:
            raise RuntimeError("WeightedSFTTrainer: TRL's fused forward did not return per-sequence log-probs")
        weighted = weighted_sequence_loss(loss, fused.log_probs, weights.to(fused.log_probs.device))
        if return_outputs:
            return weighted, fused
        return weighted
