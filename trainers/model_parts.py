"""Where a transformers model keeps what our trainers read: decoder blocks, final norm, LM head.

One lookup for every trainer that reaches inside a model: the logit lens
(:func:`trainers.lens.lens_modules`), DeCRED's heads and hooks (:mod:`trainers.decred`), the
internal-signal passes (:mod:`trainers.signals`, :mod:`trainers.rlif`) and A-LoL's reference pass
(:mod:`trainers.alol_precompute`). A new architecture is one edit here: its layer list or final
norm name in :data:`LAYER_PATHS` / :data:`NORM_NAMES`.

* :func:`unwrap`: the ``PreTrainedModel`` inside DDP (``.module``) and PEFT wrappers; PEFT injects
  its adapters into the modules in place, so hooks and forwards on the unwrapped modules run them.
* :func:`lm_backbone`: the module whose ``last_hidden_state`` feeds a decoder-only LM head.
* :func:`decoder_parts`: decoder blocks, final norm, LM head (and, for encoder-decoder models, the
  encoder and what the model applies around its head) of decoder-only models (Llama/Qwen/GPT-2
  families, BERT as a decoder) and encoder-decoder ones (T5, BART, ``SpeechEncoderDecoderModel``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LAYER_PATHS = ("layers", "h", "blocks", "block", "decoder.layers", "encoder.layer")
"""Where a decoder's block list may live, relative to the decoder (first match wins)."""

NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f", "layer_norm")
"""Names of a decoder's final norm, looked up beside its block list, then on the decoder itself."""


class UnsupportedModelError(TypeError, ValueError):
    """A model whose blocks or LM head :func:`decoder_parts` cannot find (a ``TypeError`` for the
    logit lens, a ``ValueError`` for DeCRED's option checks)."""


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel``)."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def unwrap(model: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` inside DDP (``.module``) and PEFT wrappers (adapters stay injected)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if is_peft(model) else model


def lm_backbone(model: nn.Module) -> nn.Module:
    """The module whose output's ``last_hidden_state`` (final-normed) feeds a causal LM's head."""
    return unwrap(model).base_model


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _full_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A parameter's whole shape, also when ZeRO-3 holds only this rank's partition of it."""
    return tuple(getattr(weight, "ds_shape", weight.shape))


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


def _blocks_and_norm(decoder: nn.Module) -> tuple[nn.ModuleList | None, nn.Module | None]:
    """The first :data:`LAYER_PATHS` entry that is a ``ModuleList``, and the first :data:`NORM_NAMES`
    module beside it (in the module holding the list), else on ``decoder`` itself."""
    for path in LAYER_PATHS:
        layers = _get(decoder, path)
        if isinstance(layers, nn.ModuleList):
            holder = _get(decoder, path.rpartition(".")[0]) if "." in path else decoder
            break
    else:
        return None, None
    for where in dict.fromkeys((holder, decoder)):
        norm = next((m for n in NORM_NAMES if isinstance(m := getattr(where, n, None), nn.Module)), None)
        if norm is not None:
            return layers, norm
    return layers, None


def decoder_parts(model: nn.Module) -> DecoderParts:
    """Locate decoder blocks, final norm and LM head of a decoder-only or encoder-decoder model
    (Llama/Qwen/GPT-2/BERT-decoder families, T5, BART, ``SpeechEncoderDecoderModel``), inside DDP
    or PEFT wrappers. Raises :class:`UnsupportedModelError` naming what is missing."""
    top = unwrap(model)
    config = top.config
    lm_head = top.get_output_embeddings()
    if lm_head is None or not hasattr(lm_head, "weight"):
        raise UnsupportedModelError(f"{type(top).__name__}: no linear LM head (get_output_embeddings())")
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
    layers, norm = _blocks_and_norm(decoder)
    if layers is None:
        raise UnsupportedModelError(f"{type(top).__name__}: cannot find the decoder blocks (looked for "
                                    f"{'/'.join(LAYER_PATHS)} on {type(decoder).__name__})")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return DecoderParts(top, layers, norm, lm_head, backbone, encoder, encoder_decoder, pre_scale, bias,
                        getattr(text, "final_logit_softcapping", None))
