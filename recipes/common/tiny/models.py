"""Tiny model factories built from transformers configs (random init, deterministic by seed).

Families: ``qwen2`` and ``llama`` (decoder-only), ``t5`` (encoder-decoder). Every model uses
the character tokenizer of :mod:`recipes.common.tiny.tokenizer`, and is handed out as a saved
directory so that everything downstream (TRL's reference model, PEFT, accelerate) loads it
through the ordinary ``from_pretrained`` path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from .tokenizer import build_char_tokenizer

FAMILIES = ("qwen2", "llama", "t5")


@dataclass(frozen=True)
class TinyModelSpec:
    """Size options of a tiny model; each is a ``tiny://family?key=value`` query option."""

    family: str = field(default="qwen2", metadata={"help": f"one of {FAMILIES}"})
    layers: int = field(default=3, metadata={"help": "decoder layers (and encoder layers for t5)"})
    hidden: int = field(default=128, metadata={"help": "hidden size"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    kv_heads: int = field(default=2, metadata={"help": "key/value heads (decoder-only families)"})
    intermediate: int = field(default=512, metadata={"help": "MLP width"})
    max_positions: int = field(default=256, metadata={"help": "maximum sequence length"})
    tie_embeddings: bool = field(default=True, metadata={"help": "tie input embeddings and LM head"})
    seed: int = field(default=0, metadata={"help": "initialisation seed"})

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown tiny model family {self.family!r}; expected one of {FAMILIES}")
        if self.hidden % self.heads or self.heads % max(self.kv_heads, 1):
            raise ValueError("tiny model: hidden must divide by heads and heads by kv_heads")

    def as_dict(self) -> dict:
        return asdict(self)


def build_tiny_model(spec: TinyModelSpec) -> PreTrainedModel:
    """A randomly initialised model of the given family and size (same weights for the same spec)."""
    tok = build_char_tokenizer(spec.max_positions)
    ids = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=spec.tie_embeddings,
    )
    if spec.family == "t5":
        config = T5Config(
            d_model=spec.hidden,
            d_kv=spec.hidden // spec.heads,
            d_ff=spec.intermediate,
            num_layers=spec.layers,
            num_decoder_layers=spec.layers,
            num_heads=spec.heads,
            decoder_start_token_id=tok.pad_token_id,
            feed_forward_proj="gated-gelu",
            **ids,
        )
        model_cls = T5ForConditionalGeneration
    else:
        config_cls, model_cls = (
            (Qwen2Config, Qwen2ForCausalLM) if spec.family == "qwen2" else (LlamaConfig, LlamaForCausalLM)
        )
        config = config_cls(
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_hidden_layers=spec.layers,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            max_position_embeddings=spec.max_positions,
            **ids,
        )
    torch.manual_seed(spec.seed)
    model = model_cls(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return model
