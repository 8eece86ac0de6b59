"""trainers.model_parts finds the same modules for every tiny-world family, wrapped or not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recipes.common.tiny.models import FAMILIES, TinyModelSpec, build_tiny_model
from trainers.decred import DeCREDRegularizer, DeCREDOptions
from trainers.lens import lens_modules
from trainers.model_parts import UnsupportedModelError, decoder_parts, is_peft, lm_backbone, unwrap


def tiny(family: str, layers: int = 3) -> nn.Module:
    spec = TinyModelSpec(family=family, layers=layers, hidden=32, heads=2, kv_heads=1, intermediate=64)
    return build_tiny_model(spec).eval()


def lora(model: nn.Module) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


class DDPLike(nn.Module):
    """What DDP looks like from outside: the model under ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "t5"])
def test_decoder_only_families(family):
    model = tiny(family)
    parts = decoder_parts(model)
    assert parts.model is model and not parts.encoder_decoder and parts.encoder is None
    assert parts.layers is model.model.layers and parts.num_layers == 3
    assert parts.norm is model.model.norm and parts.lm_head is model.lm_head and parts.backbone is model.model
    assert lm_backbone(model) is model.model
    assert (parts.hidden_size, parts.vocab_size) == tuple(model.lm_head.weight.shape[::-1])
    assert lens_modules(model) == (parts.layers, parts.norm, parts.lm_head)
    ids = torch.randint(0, parts.vocab_size, (2, 5))
    with torch.no_grad():  # the final head is the model's own: its logits from the backbone's output
        hidden = parts.backbone(input_ids=ids).last_hidden_state
        torch.testing.assert_close(parts.final_logits(hidden), model(input_ids=ids).logits)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "t5"])
def test_wrappers_are_seen_through(family):
    base = tiny(family)
    wrapped = lora(base)
    assert is_peft(wrapped) and not is_peft(base)
    assert unwrap(wrapped) is base and unwrap(DDPLike(wrapped)) is base and unwrap(base) is base
    assert lm_backbone(wrapped) is base.model  # not PEFT's tuner wrapper: its output has last_hidden_state
    for model in (wrapped, DDPLike(wrapped)):
        parts = decoder_parts(model)
        assert (parts.model, parts.layers, parts.norm, parts.lm_head) == (base, base.model.layers, base.model.norm,
                                                                           base.lm_head)
        assert lens_modules(model) == (base.model.layers, base.model.norm, base.lm_head)
    # PEFT's adapters sit inside the modules found: a forward of the backbone runs them
    layer = base.model.layers[0].self_attn.q_proj
    assert "lora" in type(layer).__module__.lower()


def test_encoder_decoder_family():
    model = tiny("t5")
    parts = decoder_parts(model)
    assert parts.encoder_decoder and parts.encoder is model.encoder and parts.backbone is None
    assert parts.layers is model.decoder.block and parts.norm is model.decoder.final_layer_norm
    assert parts.lm_head is model.lm_head and parts.pre_scale == pytest.approx(32**-0.5)  # tied: T5's output scale
    ids = torch.randint(0, parts.vocab_size, (2, 4))
    decoder_ids = torch.randint(0, parts.vocab_size, (2, 3))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=decoder_ids, output_hidden_states=True)
        torch.testing.assert_close(parts.final_logits(out.decoder_hidden_states[-1]), out.logits)
    with pytest.raises(TypeError, match="T5ForConditionalGeneration.*decoder layer list.*final norm"):
        lens_modules(model)  # the lens reads decoder-only models


def test_every_family_takes_decred_hooks():
    """DeCRED's regulariser hooks the blocks decoder_parts finds, for each family of the tiny world."""
    for family in FAMILIES:
        model = tiny(family)
        reg = DeCREDRegularizer(model, DeCREDOptions(layers=[1, 2]))
        assert len(reg._handles) >= 2 and reg.num_layers == 3
        reg.remove()


def test_a_model_without_blocks_is_refused_with_what_is_missing():
    class NoBlocks(nn.Module):
        config = type("Config", (), {"is_encoder_decoder": False})()

        def __init__(self):
            super().__init__()
            self.base_model = nn.Module()
            self.head = nn.Linear(4, 8)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(UnsupportedModelError, match="NoBlocks: cannot find the decoder blocks"):
        decoder_parts(NoBlocks())
    with pytest.raises(TypeError, match="the logit lens does not support NoBlocks"):
        lens_modules(NoBlocks())
    with pytest.raises(ValueError):  # DeCRED's option checks catch ValueError
        decoder_parts(NoBlocks())
