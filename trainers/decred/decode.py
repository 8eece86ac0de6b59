"""DeCRED at decode time and in analysis: averaged logits of the heads, held-out loss of every head.

:func:`averaged_logits` makes every forward (``generate`` included) return ``Σ_k w_k z^k`` over the
heads; :func:`evaluate_heads` reports each head's held-out loss and perplexity, optionally of the
decoder as an internal language model (encoder-decoder models).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
from torch import nn

from ..model_parts import DecoderParts
from .heads import options_of
from .losses import IGNORE
from .options import DeCREDOptions
from .regularizer import DeCREDRegularizer, forward_inputs


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
            kwargs = forward_inputs(batch)
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
