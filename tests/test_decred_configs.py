"""The DeCRED / LayerSkip paper configs: their provenance tables (docs/METHODS.md §8, compared key
by key with each resolved config in tests/test_paper_configs.py) hold the reference values the
issue named; and the speech model options those configs use (fixed decoder positions,
unknown-token masking)."""

import math

import pytest
import torch

from tests.test_paper_configs import TABLES, rows

CONFIGS = ["configs/decred/decred-base_librispeech.yaml", "configs/decred/decred-small_tedlium3.yaml",
           "configs/decred/qwen2.5-0.5b_metamath_layerskip.yaml"]


def test_every_paper_config_has_a_table():
    assert set(CONFIGS) <= set(TABLES)


def test_reference_values_the_issue_names():
    base, small = (rows(p) for p in CONFIGS[:2])
    assert base["trainer.max_grad_norm"][0] == small["trainer.max_grad_norm"][0] == 0.5
    assert small["speech.decoder.n_inner"][0] == 2048
    assert small["trainer.warmup_steps"][0] == 10000 and base["trainer.warmup_steps"][0] == 40000
    assert base["speech.encoder.num_attention_heads"][0] == 4
    assert base["speech.decoder_pos_emb_fixed"][0] is small["speech.decoder_pos_emb_fixed"][0] is True
    assert base["speech.mask_unks"][0] is small["speech.mask_unks"][0] is True


# ------------------------------------------------------------------ speech options of those configs


def _tiny_speech_config(**kw):
    from recipes.common.speech import SpeechConfig

    enc = {"model_type": "wav2vec2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "conv_dim": [16, 16], "conv_kernel": [10, 3], "conv_stride": [5, 4],
           "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 2}
    dec = {"model_type": "gpt2", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
           "tie_word_embeddings": False}
    return SpeechConfig(encoder=enc, decoder=dec, **kw)


def test_sinusoidal_positions_formula():
    from recipes.common.speech import SinusoidalPositions

    pe = SinusoidalPositions(8)
    out = pe(torch.tensor([[0, 3]]))
    assert out.shape == (1, 2, 8)
    p, d = 3, 8
    expected = [math.sin(p / 10000 ** (2 * i / d)) for i in range(4)] + [math.cos(p / 10000 ** (2 * i / d)) for i in range(4)]
    assert out[0, 1].tolist() == pytest.approx(expected, rel=1e-6)
    assert out[0, 0].tolist() == pytest.approx([0.0] * 4 + [1.0] * 4)
    assert not list(pe.parameters()) and "inv_freq" not in pe.state_dict()


def test_fixed_decoder_positions_forward_and_reload(tmp_path):
    from recipes.common.speech import ScaledEmbedding, SinusoidalPositions, load_speech_model, speech_model
    from recipes.common.tiny.tokenizer import build_char_tokenizer
    from trainers.decred import DeCREDOptions, attach_heads

    tok = build_char_tokenizer()
    model = speech_model(_tiny_speech_config(decoder_pos_emb_fixed=True), tok).eval()
    body = model.decoder.transformer
    assert isinstance(body.wte, ScaledEmbedding) and isinstance(body.wpe, SinusoidalPositions)
    assert model.decoder.lm_head.weight is not body.wte.weight  # untied, as the reference
    assert 0.8 < float(body.wte.weight.detach().std()) < 1.2  # N(0, 1) before the √d scale
    ids = torch.tensor([[1, 10, 11, 12]])
    captured = {}
    handle = body.h[0].register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    with torch.no_grad():
        model.decoder(input_ids=ids)
    handle.remove()
    pe = SinusoidalPositions(32)(torch.arange(4)[None])
    explicit = body.wte.weight[ids] * math.sqrt(32) + pe
    assert torch.allclose(captured["x"], explicit, atol=1e-5)
    # a saved model comes back with the same positions and heads
    attach_heads(model, DeCREDOptions(layers=[2], weights=[0.3, 0.7]))
    model.save_pretrained(tmp_path)
    again = load_speech_model(tmp_path).eval()
    x = torch.randn(1, 1600)
    with torch.no_grad():
        a = model(input_values=x, decoder_input_ids=ids).logits
        b = again(input_values=x, decoder_input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(again.decred_heads.heads["2"].weight, model.decred_heads.heads["2"].weight)


def test_mask_unks_in_collator():
    from recipes.common.speech import SpeechCollator, train_bpe

    tok = train_bpe(["abc abc", "cab"], 40)
    rows = [{"audio": [0.0] * 800, "text": "abz"}, {"audio": [0.1] * 800, "text": "cab"}]
    plain = SpeechCollator(tok, _tiny_speech_config())(rows)["labels"]
    masked = SpeechCollator(tok, _tiny_speech_config(mask_unks=True))(rows)["labels"]
    unk = tok.unk_token_id
    assert (plain == unk).any()  # "z" is unknown to this tokenizer
    assert not (masked == unk).any()
    assert torch.equal(masked, plain.masked_fill(plain == unk, -100))
