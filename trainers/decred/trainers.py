"""DeCRED's trainers: the auxiliary heads' loss in TRL's SFT, transformers' Seq2Seq and our RLIF trainer.

:class:`DeCREDMixin` builds the heads and the regulariser, logs every head's loss and accuracy and
strips the heads on export if asked; each trainer overrides only its loss method and calls the
model's (or TRL's) own forward once, the regulariser's hooks capturing the states it needs.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import Seq2SeqTrainer
from trl import SFTTrainer

from ..model_parts import is_peft, unwrap
from ..rlif import RLIFTrainer
from .heads import heads_stripped
from .losses import IGNORE
from .options import DeCREDOptions
from .regularizer import DeCREDRegularizer, forward_inputs


class DeCREDMixin:
    """Trainer mixin: ``decred=DeCREDOptions`` keyword; builds the heads and the regulariser,
    logs ``decred/loss_<layer>`` and ``decred/acc_<layer>``, strips heads on export if asked."""

    def __init__(self, *args, decred: DeCREDOptions | None = None, **kwargs):
        self.decred_options = decred or DeCREDOptions()
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, nn.Module) and not is_peft(model):
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
        kwargs = {**forward_inputs(inputs), "use_cache": False}
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
        kwargs = forward_inputs(inputs)
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
