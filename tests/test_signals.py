"""trainers.signals against naive full-softmax references (docs/METHODS.md §2, §3, §6)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch


try:
    from trainers import signals as S
except ImportError:  # the repository root is not importable (e.g. pytest run from elsewhere): load by path
    _spec = importlib.util.spec_from_file_location(
        "intrinsic_test_signals", Path(__file__).resolve().parents[1] / "trainers" / "signals.py"
    )
    S = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(S)


B, L, V, H = 3, 7, 50, 16
ATOL = 2e-5


def _inputs(seed=0, dtype=torch.float32, bias=True, target_high=V):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(B, L, H, generator=g) * 2).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, target_high, (B, L), generator=g)
    return hidden, weight, b, targets


def _reference(hidden, weight, bias, targets, temperature=1.0, vocab_size=None, logit_scale=1.0, softcap=None):
    """Full (B, L, V) logits in float64, straight from the formulas."""
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    z = hidden.double() @ weight[:vocab].double().T
    if bias is not None:
        z = z + bias[:vocab].double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return {
        "logps": logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        "entropy": -(p * logp).sum(-1),
        # KL(U || p) = sum_j (1/V) log((1/V) / p_j)
        "self_certainty": (-math.log(vocab) - logp).mean(-1),
    }


def _assert_close(out, ref, atol=ATOL, rtol=1e-5):
    assert set(out) == set(ref)
    for name in ref:
        assert out[name].dtype == torch.float32, name
        assert out[name].shape == ref[name].shape, name
        torch.testing.assert_close(out[name].double(), ref[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
@pytest.mark.parametrize("vocab_chunk_size", [None, 7, 1000])
def test_signals_match_full_softmax(temperature, chunk_size, vocab_chunk_size):
    hidden, weight, bias, targets = _inputs()
    out = S.token_signals(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=temperature,
        chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )
    _assert_close(out, _reference(hidden, weight, bias, targets, temperature))


def test_self_certainty_is_a_kl_and_temperature_changes_it():
    hidden, weight, bias, targets = _inputs(seed=1)
    sc1 = S.token_signals(hidden, weight, targets, bias=bias, signals=["self_certainty"])["self_certainty"]
    sc2 = S.token_signals(hidden, weight, targets, bias=bias, temperature=2.0, signals=["self_certainty"])[
        "self_certainty"
    ]
    assert (sc1 >= 0).all() and (sc2 >= 0).all()
    # a flatter distribution is closer to uniform
    assert (sc2 < sc1).all()
    # uniform logits -> exactly zero KL and entropy log V
    zero = S.token_signals(torch.zeros(2, 3, H), weight, targets[:2, :3], signals=("self_certainty", "entropy"))
    torch.testing.assert_close(zero["self_certainty"], torch.zeros(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(zero["entropy"], torch.full((2, 3), math.log(V)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("names", [("logps",), ("entropy",), ("self_certainty",), ("self_certainty", "logps")])
def test_any_subset(names):
    hidden, weight, bias, targets = _inputs(seed=2)
    out = S.token_signals(hidden, weight, targets, bias=bias, temperature=0.9, signals=names, chunk_size=4)
    ref = _reference(hidden, weight, bias, targets, 0.9)
    _assert_close(out, {name: ref[name] for name in names})


@pytest.mark.parametrize("vocab_chunk_size", [None, 8])
def test_vocab_size_restricts_softmax_mean_and_log_v(vocab_chunk_size):
    hidden, weight, bias, targets = _inputs(seed=3, target_high=37)
    out = S.token_signals(
        hidden,
        weight,
        targets,
        bias=bias,
        temperature=0.8,
        vocab_size=37,
        chunk_size=5,
        vocab_chunk_size=vocab_chunk_size,
    )
    ref = _reference(hidden, weight, bias, targets, 0.8, vocab_size=37)
    _assert_close(out, ref)
    full = _reference(hidden, weight, bias, targets, 0.8)
    assert (out["self_certainty"].double() - full["self_certainty"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="target ids"):
        S.token_signals(hidden, weight, torch.full_like(targets, 40), vocab_size=37)
    with pytest.raises(ValueError, match="vocab_size"):
        S.token_signals(hidden, weight, targets, vocab_size=V + 1)


def test_bf16_inputs_are_computed_in_fp32():
    hidden, weight, bias, targets = _inputs(seed=4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # must not leak into the computation
        out = S.token_signals(hidden, weight, targets, bias=bias, temperature=0.9, chunk_size=5, vocab_chunk_size=16)
    # reference from the very same bf16 values, upcast: only fp32 rounding may differ
    _assert_close(out, _reference(hidden, weight, bias, targets, 0.9), atol=1e-4, rtol=1e-5)


def test_softcap_and_logit_scale():
    hidden, weight, bias, targets = _inputs(seed=5)
    kwargs = {"logit_scale": 0.5, "final_logit_softcapping": 3.0}
    out = S.token_signals(
        hidden, weight, targets, bias=bias, temperature=0.7, chunk_size=5, vocab_chunk_size=9, **kwargs
    )
    ref = _reference(hidden, weight, bias, targets, 0.7, logit_scale=0.5, softcap=3.0)
    _assert_close(out, ref)


def test_no_graph_and_inference_mode():
    hidden, weight, bias, targets = _inputs(seed=6)
    weight.requires_grad_(True)
    hidden.requires_grad_(True)
    out = S.token_signals(hidden, weight, targets, bias=bias)
    assert not any(t.requires_grad for t in out.values())
    with torch.inference_mode():
        out2 = S.token_signals(hidden.detach(), weight.detach(), targets, bias=bias)
    for name in out:
        torch.testing.assert_close(out[name], out2[name], atol=0, rtol=0)


def test_bad_arguments():
    hidden, weight, bias, targets = _inputs()
    with pytest.raises(ValueError, match="signals"):
        S.token_signals(hidden, weight, targets, signals=("perplexity",))
    with pytest.raises(ValueError, match="temperature"):
        S.token_signals(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="shapes"):
        S.token_signals(hidden, weight, targets[:, :-1])
    with pytest.raises(ValueError, match="target ids"):
        S.token_signals(hidden, weight, torch.full_like(targets, -100))
    empty = S.token_signals(hidden[:, :0], weight, targets[:, :0])
    assert all(v.shape == (B, 0) for v in empty.values())


# ----------------------------------------------------------------------------- masks


def _right_padded_mask():
    return torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ]
    )


def test_masked_mean_with_padding():
    hidden, weight, bias, targets = _inputs(seed=7)
    mask = _right_padded_mask()
    out = S.token_signals(hidden, weight, targets, bias=bias, temperature=0.9, chunk_size=5)
    ref = _reference(hidden, weight, bias, targets, 0.9)
    for name in out:
        values = out[name].clone()
        values[mask == 0] = float("nan")  # garbage at padding must not leak
        got = S.masked_mean(values, mask)
        assert got.shape == (B,)
        torch.testing.assert_close(got[0].double(), ref[name][0].mean(), atol=ATOL, rtol=1e-5)
        torch.testing.assert_close(got[1].double(), ref[name][1, :3].mean(), atol=ATOL, rtol=1e-5)
        assert torch.isnan(got[2])  # nothing to average: NaN, never a silent 0
    assert S.masked_mean(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool), empty=0.0).tolist() == [0.0, 0.0]
    torch.testing.assert_close(
        S.masked_mean(torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[True, False, True]])), torch.tensor([2.5])
    )


# ----------------------------------------------------------------------------- alignment with a real model


def _tiny_qwen(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=V,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
    )
    return Qwen2ForCausalLM(config).eval()


def _trl_like_batch():
    """Left-padded prompts (P = 5) + right-padded completions (C = 4), as GRPOTrainer builds them."""
    g = torch.Generator().manual_seed(11)
    prompt_ids = torch.randint(1, V, (B, 5), generator=g)
    prompt_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 0, 0, 1]])
    prompt_ids = prompt_ids.masked_fill(prompt_mask == 0, 0)
    completion_ids = torch.randint(1, V, (B, 4), generator=g)
    completion_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1)
    return input_ids, attention_mask, completion_ids, completion_mask


def test_alignment_matches_model_logits():
    model = _tiny_qwen()
    input_ids, attention_mask, completion_ids, completion_mask = _trl_like_batch()
    P, C = 5, completion_ids.shape[1]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    logits, hidden = out.logits.double(), out.hidden_states[-1]  # [-1] is already final-normed
    # helper == explicit slice, and it reproduces the model's own logits at the predicting positions
    states = S.completion_hidden_states(hidden, P, C)
    assert torch.equal(states, hidden[:, P - 1 : P - 1 + C])
    assert torch.equal(S.completion_hidden_states(hidden, P), states)
    torch.testing.assert_close(
        (states @ model.lm_head.weight.T).double(), logits[:, P - 1 : P - 1 + C], atol=1e-5, rtol=1e-5
    )
    # TRL's convention: logits_to_keep = C + 1, drop the last position
    torch.testing.assert_close(S.completion_hidden_states(logits, P, C), logits[:, -C - 1 : -1], atol=0, rtol=0)

    T = 0.8
    sig = S.completion_signals(hidden, model.lm_head.weight, input_ids, P, temperature=T, chunk_size=5)
    z = logits / T
    logp = z.log_softmax(-1)
    # logps[b, t] = log_softmax(logits[b, P - 1 + t] / T)[input_ids[b, P + t]]: the next token
    next_token_logps = logp[:, :-1].gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)[:, P - 1 :]
    torch.testing.assert_close(sig["logps"].double(), next_token_logps, atol=ATOL, rtol=1e-5)
    zc = z[:, P - 1 : P - 1 + C]
    torch.testing.assert_close(
        sig["self_certainty"].double(), zc.logsumexp(-1) - zc.mean(-1) - math.log(V), atol=ATOL, rtol=1e-5
    )
    lpc = logp[:, P - 1 : P - 1 + C]
    torch.testing.assert_close(sig["entropy"].double(), -(lpc.exp() * lpc).sum(-1), atol=ATOL, rtol=1e-5)
    # an off-by-one (the authors' TRL bug) would give different numbers
    shifted = logp[:, P : P + C - 1].gather(-1, completion_ids[:, :-1].unsqueeze(-1)).squeeze(-1)
    assert (sig["logps"][:, :-1].double() - shifted).abs().max() > 1e-2
    # per-completion mean over real tokens (docs/METHODS.md §2)
    per_seq = S.masked_mean(sig["self_certainty"], completion_mask)
    expected = [
        (zc[b].logsumexp(-1) - zc[b].mean(-1) - math.log(V))[completion_mask[b].bool()].mean() for b in range(B)
    ]
    torch.testing.assert_close(per_seq.double(), torch.stack(expected), atol=ATOL, rtol=1e-5)


def test_logps_match_trl_fused_head():
    """Same numbers as the log-probs GRPOTrainer computes (labels built as in _get_per_token_logps_and_entropies)."""
    from trl.trainer.utils import add_fused_lm_head

    model = _tiny_qwen(seed=1)
    input_ids, attention_mask, completion_ids, _ = _trl_like_batch()
    P, C = 5, completion_ids.shape[1]
    T = 0.9
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]
    ours = S.completion_signals(hidden, model.lm_head.weight, input_ids, P, temperature=T, signals=("logps", "entropy"))

    add_fused_lm_head(model, temperature=T, outputs=("log_probs", "entropy"))
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-C] = -100
    with torch.no_grad():
        fused = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
    real = attention_mask[:, -C:].bool()
    torch.testing.assert_close(ours["logps"][real], fused.log_probs[:, -C:][real], atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(ours["entropy"][real], fused.entropy[:, -C:][real], atol=ATOL, rtol=1e-5)
