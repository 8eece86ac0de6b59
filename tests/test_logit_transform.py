"""Signals from the model's own output distribution when the forward transforms its logits after the head.

Gemma-2 soft-caps (``final_logit_softcapping``), Cohere multiplies (``logit_scale``), Granite divides
(``logits_scaling``). Every signal path (RLIF hook, ``token_signal_dicts``, the lens readout, the
A-LoL precompute) is checked against ``log_softmax(model(...).logits)`` on tiny random models whose
head is scaled up so the transform changes the numbers a lot.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.lens import LogitLens
from trainers.logit_transform import IDENTITY, LogitTransform, logit_transform
from trainers.signals import pack_prompt_completion, token_signal_dicts

FAMILIES = {
    # config class, transform options, head multiplier (raw logits of a few units up to tens)
    "gemma2": ("Gemma2Config", {"final_logit_softcapping": 2.0, "head_dim": 16}, 40.0),
    "cohere": ("CohereConfig", {"logit_scale": 0.0625}, 60.0),
    "granite": ("GraniteConfig", {"logits_scaling": 8.0}, 60.0),
}


def _tiny(kind: str, directory: Path) -> str:
    from recipes.common.tiny.tokenizer import build_char_tokenizer

    config_name, options, multiplier = FAMILIES[kind]
    tok = build_char_tokenizer()
    config = getattr(transformers, config_name)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(multiplier)
    path = directory / kind
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    path = _tiny(request.param, tmp_path_factory.mktemp("transform"))
    return request.param, path


def _own_logprobs(model, ids, mask, temperature=1.0):
    with torch.no_grad():
        return (model(input_ids=ids, attention_mask=mask).logits.double() / temperature).log_softmax(-1)


def test_reads_every_family_config():
    from transformers import (CohereConfig, FalconH1Config, Gemma2Config, Gemma3TextConfig, GraniteConfig,
                              GraniteMoeConfig, Qwen2Config, RecurrentGemmaConfig)

    assert logit_transform(Gemma2Config(final_logit_softcapping=30.0)) == LogitTransform(1.0, 30.0)
    assert logit_transform(Gemma3TextConfig(final_logit_softcapping=20.0)).softcap == 20.0
    assert logit_transform(CohereConfig(logit_scale=0.125)) == LogitTransform(0.125, None)
    assert logit_transform(GraniteConfig(logits_scaling=4.0)) == LogitTransform(0.25, None)
    assert logit_transform(GraniteMoeConfig(logits_scaling=2.0)).scale == 0.5
    assert logit_transform(FalconH1Config(lm_head_multiplier=0.5)).scale == 0.5
    assert logit_transform(RecurrentGemmaConfig(logits_soft_cap=30.0)).softcap == 30.0
    assert logit_transform(Qwen2Config()) == IDENTITY
    hyper = transformers.AutoConfig.for_model("hyperclovax", logits_scaling=0.5)
    assert logit_transform(hyper).scale == 0.5  # HyperCLOVA X multiplies


KNOWN = {"final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier",
         "logits_soft_cap", "output_logit_soft_cap"}
NOT_TRANSFORMS = {"unpadded_vocab_size"}  # Inkling slices its padded head: a vocabulary restriction, not a transform
# ``<x>config<.text_config | .get_text_config()>.NAME`` or ``getattr(<...config...>, "NAME"``
_CONFIG_ATTR = r"(?:config(?:\.text_config|\.get_text_config\([^)]*\))?\.(\w+)|getattr\([^,]*config[^,]*,\s*\"(\w+)\")"


def _names(text: str) -> list[str]:
    return [a or b for a, b in re.findall(_CONFIG_ATTR, text)]


def test_every_config_driven_logit_transform_in_transformers_is_known():
    """Scan every ``modeling_*.py``: a config attribute used on the logits right after the head is one we read.

    Attributes reach the forward directly (``self.config.logits_scaling``) or through ``self.<name>``
    set from the config in ``__init__`` (Cohere's ``self.logit_scale``, Inkling-2's softcap module).
    """
    root = Path(transformers.__file__).parent / "models"
    found: dict[str, set[str]] = {}
    for path in root.glob("*/modeling_*.py"):
        source = path.read_text()
        from_init = {m.group(1): m.group(2) or m.group(3) for m in re.finditer(r"self\.(\w+) = [^\n]*?" + _CONFIG_ATTR, source)}
        lines = source.split("\n")
        for i, line in enumerate(lines):
            if not re.search(r"logits = self\.lm_head\(", line):
                continue
            window = [line.split("lm_head(", 1)[1]]  # what follows the head call on its line, then the next lines
            for nxt in lines[i + 1 : i + 12]:
                if re.search(r"loss = None|if labels|return ", nxt):
                    break
                window.append(nxt)
            local = {m.group(1): m.group(2) or m.group(3)
                     for m in re.finditer(r"(\w+) = [^\n]*?" + _CONFIG_ATTR, "\n".join(window))}
            for j, text in enumerate(window):
                if re.search(r"\blogits\s*=[^\n]*(\*|/|tanh|soft_?cap)", text) or (j == 0 and re.search(r"\*|/", text)):
                    names = _names(text)
                    names += [from_init[a] for a in re.findall(r"self\.(?:model\.)?(\w+)", text) if a in from_init]
                    names += [local[a] for a in re.findall(r"\b(\w+)\b(?!\.)", text.split("=", 1)[-1]) if a in local]
                    for name in names:
                        found.setdefault(name, set()).add(path.parent.name)
    assert {"final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier"} <= set(found)
    unknown = {name: sorted(models) for name, models in found.items() if name not in KNOWN | NOT_TRANSFORMS}
    assert not unknown, f"logit transforms read from configs we do not apply: {unknown}"


def test_token_signal_dicts_match_the_models_own_logits(family):
    kind, path = family
    model, tok = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    assert not logit_transform(model).identity
    prompts = ["12+34=", "7+5="]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tok("46", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                      tok("1x2", add_special_tokens=False)["input_ids"]]
    out = token_signal_dicts(model, tok, prompt_ids, completion_ids, prompts, temperature=0.7,
                             signals=("logps", "entropy", "self_certainty"))
    ids, mask, p = pack_prompt_completion(prompt_ids, completion_ids, tok.pad_token_id)
    logp = _own_logprobs(model, ids, mask, 0.7)
    gaps = []
    for row, c in enumerate(completion_ids):
        ref = logp[row, p - 1 : p - 1 + len(c)]
        targets = torch.tensor(c)
        want = {"logps": ref.gather(-1, targets[:, None])[:, 0], "entropy": -(ref.exp() * ref).sum(-1),
                "self_certainty": -ref.mean(-1) - math.log(ref.shape[-1])}
        for name, value in want.items():
            torch.testing.assert_close(out[row][name].double(), value, rtol=1e-4, atol=1e-4, msg=f"{kind} {name}")
        # the raw head's distribution is far from it (the transform matters in this test)
        with torch.no_grad():
            raw = model.get_output_embeddings()(model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state)
        raw_logp = (raw[row, p - 1 : p - 1 + len(c)].double() / 0.7).log_softmax(-1)
        gaps.append(float((raw_logp.gather(-1, targets[:, None])[:, 0] - want["logps"]).abs().mean()))
    assert max(gaps) > 0.1


def test_lens_readout_last_layer_is_the_models_own_distribution(family):
    kind, path = family
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    n_layers = model.config.num_hidden_layers
    lens = LogitLens(model, [1, n_layers])
    assert lens.transform == logit_transform(model)
    torch.manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))  # prompt 5, completion 4
    lens.arm([[0, 2, 3], [1]], completion_length=4)
    with torch.no_grad():
        _ = model(ids)
    states, counts = lens.collect()
    positions = [(0, 0), (0, 2), (0, 3), (1, 1)]
    emitted = torch.tensor([ids[r, 5 + t] for r, t in positions])
    stats = lens.statistics(states, emitted)
    logp = _own_logprobs(model, ids, torch.ones_like(ids))
    want = torch.stack([logp[r, 4 + t, ids[r, 5 + t]] for r, t in positions])
    torch.testing.assert_close(stats["logp"][:, -1].double(), want, rtol=1e-4, atol=1e-4, msg=kind)
    assert stats["argmax"][:, -1].tolist() == [int(logp[r, 4 + t].argmax()) for r, t in positions]


def test_rlif_hook_matches_the_models_own_logits(family, tmp_path):
    from tests.test_rlif import check_against_naive, make_trainer

    from rewards import SelfCertainty

    kind, path = family
    trainer = make_trainer(path, tmp_path, [SelfCertainty()])
    assert not trainer._logit_transform.identity
    check_against_naive(trainer, trainer.model)  # also against TRL's fused-head log-probs and entropy


@pytest.mark.parametrize("kind", ["gemma2", "granite"])
def test_alol_reference_logps_are_the_models_own(kind, tmp_path):
    from tests.test_alol import _trainer

    path = _tiny(kind, tmp_path)
    trainer = _trainer(path, tmp_path, value=False)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    data = trainer.alol.dataset
    for row in range(4):
        ids = torch.tensor(data[row]["input_ids"])[None]
        ref = torch.tensor(data[row]["alol_ref_logps"], dtype=torch.float64)
        logp = _own_logprobs(model, ids, torch.ones_like(ids))[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(ref, logp[-len(ref):], rtol=1e-4, atol=1e-4, msg=kind)
