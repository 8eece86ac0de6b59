"""The transform a model applies to its logits after the LM head, read from its config in one place.

Some architectures do not sample from ``W h + b`` but from a transformed copy (transformers'
``*ForCausalLM.forward``, right after ``self.lm_head``)::

    z = softcap(scale * (W h + b))           softcap(x) = c * tanh(x / c)

==============================================  =====================================================
config attribute (text config)                  families
==============================================  =====================================================
``logit_scale`` (multiply)                      Cohere, Cohere2, Cohere2-MoE, Cohere-Compass
``output_multiplier`` (multiply)                Muse Glimmer / Spark (then soft-capped)
``lm_head_multiplier`` (multiply)               Falcon-H1
``logits_scaling`` (divide)                     Granite, Granite-SWA, GraniteMoe(-SWA/-Hybrid/-Shared),
                                                Granite vision/docling text models, MiniCPM3 (divides
                                                the hidden state before a bias-free head: the same)
``logits_scaling`` (multiply)                   HyperCLOVA X (``model_type == "hyperclovax"``)
``final_logit_softcapping``                     Gemma-2, Gemma-3, Gemma-3n, Gemma-4, VaultGemma,
                                                T5Gemma, PaliGemma, Beam, NanoChat, Mistral-Large-4,
                                                Inkling-2, Diffusion-Gemma, Muse
``logits_soft_cap``                             RecurrentGemma
``output_logit_soft_cap``                       xLSTM
==============================================  =====================================================

The scale rules are those of TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``), so our
signals and TRL's training log-probs see the same distribution; the last two soft-cap names are
ours (TRL's fused head reads only ``final_logit_softcapping``). Sampling divides the transformed logits by
the temperature, so every signal path computes ``softcap(scale * (W h + b)) / T`` (the order of
``trl.kernels.ChunkedLogProbFunction``).

Not covered here (not a per-logit transform): Chameleon masks its image tokens to the dtype's
minimum, Inkling slices the logits to ``unpadded_vocab_size`` (a vocabulary restriction, see the
padded-rows rule in :mod:`trainers.signals`), and encoder-decoder models' ``final_logits_bias``
(BART family) are outside the decoder-only signal paths.

>>> from transformers import Gemma2Config, CohereConfig, GraniteConfig
>>> logit_transform(Gemma2Config(final_logit_softcapping=30.0))
LogitTransform(scale=1.0, softcap=30.0)
>>> logit_transform(CohereConfig(logit_scale=0.0625)).scale
0.0625
>>> logit_transform(GraniteConfig(logits_scaling=8.0)).scale
0.125
>>> LogitTransform(2.0, 1.0).apply(torch.tensor([0.0, 10.0])).tolist()
[0.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .model_parts import unwrap

__all__ = ["IDENTITY", "LogitTransform", "logit_transform"]


@dataclass(frozen=True)
class LogitTransform:
    """``z -> softcap(scale * z)`` (``softcap=None``: no capping)."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def apply(self, z: torch.Tensor) -> torch.Tensor:
        """The transform in fp32 (``z`` is upcast first)."""
        z = z.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z

    def kwargs(self) -> dict:
        """As :func:`trainers.signals.token_signals` keyword arguments."""
        return {"logit_scale": self.scale, "final_logit_softcapping": self.softcap}


IDENTITY = LogitTransform()


def _text_config(obj):
    config = getattr(unwrap(obj) if isinstance(obj, nn.Module) else obj, "config", obj)  # a model or a config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(model_or_config) -> LogitTransform:
    """The :class:`LogitTransform` a model's forward applies after its LM head (module docstring table)."""
    config = _text_config(model_or_config)
    scale = getattr(config, "logit_scale", None)
    if scale is None:
        scale = getattr(config, "output_multiplier", None)
    if scale is None:
        scale = getattr(config, "lm_head_multiplier", None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = float(config.logits_scaling)
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    softcap = None
    for name in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"):
        if getattr(config, name, None) is not None:
            softcap = float(getattr(config, name))
            break
    return LogitTransform(1.0 if scale is None else float(scale), softcap)
