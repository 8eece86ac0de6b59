"""DeCRED's heads as part of the model: attach, strip for export, save and load with the checkpoint.

The heads are a submodule (``model.decred_heads``) so optimisers, DDP and ``save_pretrained`` see
them; their layout is stored in ``model.config.decred`` and :func:`load_heads` rebuilds them after
``from_pretrained`` (which drops their weights as unexpected keys).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..model_parts import decoder_parts, unwrap
from .options import DeCREDOptions


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
