"""DeCRED / LayerSkip auxiliary decoder heads: weights, losses against explicit formulas, trainers,
save/load, CTC, decode-time averaging, internal LM."""

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    SpeechEncoderDecoderModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
)
from transformers.trainer_pt_utils import LabelSmoother
from trl import SFTConfig

from recipes.common.tiny.models import TinyModelSpec, build_tiny_model
from recipes.common.tiny.tokenizer import build_char_tokenizer
from trainers.decred import (
    DeCREDOptions,
    DeCREDRegularizer,
    DeCREDSeq2SeqTrainer,
    DeCREDSFTTrainer,
    averaged_logits,
    chunked_head_loss,
    active_layers,
    curriculum_mask,
    evaluate_heads,
    from_pretrained_with_heads,
    fused_heads_ce,
    head_weights,
    label_smoothed_ce,
    layer_scales,
    seq2seq_args,
    step_weights,
)

ROWS = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in [(12, 34), (7, 5), (99, 1), (3, 4)] * 4]


def tiny(family="qwen2", layers=4, **kw):
    return build_tiny_model(TinyModelSpec(family=family, layers=layers, hidden=32, heads=2, kv_heads=1, intermediate=64,
                                          **kw))


def sft_args(tmp_path, **kw):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=4,
                  report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, bf16=False, seed=0, max_length=32)
    values.update(kw)
    return SFTConfig(**values)


def causal_batch(tok):
    prompts, completions = ["12+34=", "7+5="], ["46</s>", "12</s>"]
    ids = [tok(p + c, add_special_tokens=False)["input_ids"] for p, c in zip(prompts, completions)]
    n_prompt = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    labels = input_ids.masked_fill(mask == 0, -100)
    for row, n in enumerate(n_prompt):
        labels[row, :n] = -100
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# ------------------------------------------------------------------ weights


def test_layer_scales_documented_values():
    layers, L = [1, 2, 3], 4
    expected = {
        "uniform": [1, 1, 1, 1],
        "l": [1, 2, 3, 4],
        "sum_l": [1, 3, 6, 10],
        "sqrt_l": [1, math.sqrt(2), math.sqrt(3), 2],
        "inv_l": [1, 1 / 2, 1 / 3, 1 / 4],
        "inv_sqrt_l": [1, 1 / math.sqrt(2), 1 / math.sqrt(3), 1 / 2],
    }
    for scale, raw in expected.items():
        ours = layer_scales(layers, L, scale)
        assert ours == pytest.approx([r / sum(raw) for r in raw]), scale
        assert sum(ours) == pytest.approx(1.0)
    # inactive heads get 0 and the rest renormalise; the final head is always on
    assert layer_scales(layers, L, "l", [False, True, False]) == pytest.approx([0, 2 / 6, 0, 4 / 6])
    with pytest.raises(ValueError, match="unknown scale"):
        layer_scales(layers, L, "cubic")


def test_layer_scales_match_torchtune_by_hand():
    """torchtune's scale functions take the 0-based ids of the active layers (final included),
    use l = id + 1 and normalise over them; sum_l is torch.cumsum over those active l only."""
    # active heads after blocks 2 and 6 of 8 (+ final 8): l = 2, 6, 8
    assert layer_scales([2, 4, 6], 8, "sum_l", [True, False, True]) == pytest.approx([2 / 26, 0, 8 / 26, 16 / 26])
    assert layer_scales([2, 6], 8, "sum_l") == pytest.approx([2 / 26, 8 / 26, 16 / 26])
    assert layer_scales([2, 4, 6], 8, "l", [True, False, True]) == pytest.approx([2 / 16, 0, 6 / 16, 8 / 16])
    assert layer_scales([2, 4, 6], 8, "inv_l", [True, False, True]) == pytest.approx(
        [v / (1 / 2 + 1 / 6 + 1 / 8) for v in (1 / 2, 0, 1 / 6, 1 / 8)])
    # the LayerSkip config's heads, 0::4 on 24 blocks: l = 1, 5, 9, 13, 17, 21, 24
    cum = [1, 6, 15, 28, 45, 66, 90]
    assert layer_scales([1, 5, 9, 13, 17, 21], 24, "sum_l") == pytest.approx([c / 251 for c in cum])
    # only the final head: weight 1
    assert layer_scales([3], 4, "sum_l", [False]) == pytest.approx([0, 1])


def _torchtune_rotational(initial: list[bool], steps: int) -> list[bool]:
    """RotationalEarlyExitCurriculum as its recipe drives it: np.roll by 1 per optimiser step."""
    import numpy as np

    mask = np.array(initial)
    for _ in range(steps):
        mask = np.roll(mask, 1)
    return mask.tolist()


def _torchtune_gradual(initial: list[bool], max_steps: int, steps: int) -> list[bool]:
    """GradualEarlyExitCurriculum: all off, then each step() computes the mask from its counter
    (fraction = counter / max_steps, threshold 0.5 (n - i) / n over 0-based i) and increments it."""
    n, mask, counter = len(initial), [False] * len(initial), 0
    for _ in range(steps):
        mask = [counter / max_steps >= 0.5 * (n - i) / n and initial[i] for i in range(n)]
        counter += 1
    return mask


def test_curricula_match_torchtune():
    L = 8
    # rotational: blocks 1 and 5 of 8 (0-based 0, 4) roll one block per step over all blocks
    assert active_layers([1, 5], L, 0, 100, "rotational") == [1, 5]
    assert active_layers([1, 5], L, 1, 100, "rotational") == [2, 6]
    assert active_layers([1, 5], L, 3, 100, "rotational") == [4]  # block 8 is the final head
    assert active_layers([1, 5], L, 4, 100, "rotational") == [1, 5]
    assert active_layers([2, 3], L, 7, 100, "rotational") == [1, 2]
    # gradual: l on once (step - 1)/max ≥ 0.5 (L - l + 1)/L: l=6 from step 20, l=4 from 33, l=2 from 45
    layers = [2, 4, 6]
    assert active_layers(layers, L, 0, 100, "gradual") == []
    assert active_layers(layers, L, 19, 100, "gradual") == []
    assert active_layers(layers, L, 20, 100, "gradual") == [6]
    assert active_layers(layers, L, 32, 100, "gradual") == [6]
    assert active_layers(layers, L, 33, 100, "gradual") == [4, 6]
    assert active_layers(layers, L, 44, 100, "gradual") == [4, 6]
    assert active_layers(layers, L, 45, 100, "gradual") == [2, 4, 6]
    # against the emulated torchtune classes for a few layer sets and every step
    for layers, L, max_steps in [([1, 5], 8, 40), ([2, 4, 6], 8, 30), ([1, 5, 9, 13, 17, 21], 24, 60), ([3], 4, 10)]:
        initial = [b in layers for b in range(1, L + 1)]
        for step in range(max_steps + 3):
            rolled = _torchtune_rotational(initial, step)
            assert active_layers(layers, L, step, max_steps, "rotational") == [b for b in range(1, L) if rolled[b - 1]]
            gradual = _torchtune_gradual(initial, max_steps, step)
            assert active_layers(layers, L, step, max_steps, "gradual") == [b for b in range(1, L) if gradual[b - 1]]


def test_curricula():
    layers, L = [2, 4, 6], 8
    assert curriculum_mask(layers, L, 5, 10) == [True, True, True]
    assert curriculum_mask(layers, L, 0, 10, "round_robin", rotation=2) == [True, False, True]
    assert curriculum_mask(layers, L, 1, 10, "round_robin", rotation=2) == [False, True, False]
    assert curriculum_mask(layers, L, 4, 10, "round_robin", rotation=3) == [False, True, False]
    assert curriculum_mask(layers, L, 2, 10, "rotational") == [False, True, True]  # rolled to blocks 4, 6, 8
    assert active_layers(layers, L, 2, 10, "rotational") == [4, 6]
    with pytest.raises(ValueError, match="head: shared"):
        DeCREDOptions(layers=[2], curriculum="rotational")
    with pytest.raises(ValueError, match="head: shared"):
        DeCREDOptions(layers=[2], head="shared", weights=[0.3, 0.7], curriculum="rotational")


def test_head_weights_fixed_and_scaled():
    fixed = DeCREDOptions(layers=[6], weights=[0.3, 0.7])
    assert head_weights(fixed, 8) == [0.3, 0.7]
    rot = DeCREDOptions(layers=[2, 4], weights=[0.2, 0.3, 0.5], curriculum="round_robin")
    assert head_weights(rot, 8, step=1) == [0.0, 0.3, 0.5]  # fixed weights are zeroed, not renormalised
    scaled = DeCREDOptions(layers=[2, 4], scale="l", curriculum="round_robin")
    assert head_weights(scaled, 8, step=0) == pytest.approx([2 / 10, 0, 8 / 10])
    rolled = DeCREDOptions(layers=[2, 4], head="shared", scale="sum_l", curriculum="rotational")
    assert step_weights(rolled, 8, step=1) == pytest.approx({3: 3 / 27, 5: 8 / 27, 8: 16 / 27})  # l = 3, 5, 8
    with pytest.raises(ValueError, match="one weight per aux layer"):
        DeCREDOptions(layers=[2, 4], weights=[0.3, 0.7])
    with pytest.raises(ValueError, match="1..7"):
        DeCREDOptions(layers=[8]).check_depth(8)


# ------------------------------------------------------------------ losses


def test_label_smoothed_ce_matches_transformers_and_formula():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    n = (labels != -100).sum()
    for eps in (0.0, 0.1):
        ours = label_smoothed_ce(logits, labels, eps).sum() / n
        assert ours == pytest.approx(float(LabelSmoother(epsilon=eps)({"logits": logits}, labels)), rel=1e-6)
        logp = logits.log_softmax(-1)
        valid = labels != -100
        explicit = sum((1 - eps) * -logp[b, t, labels[b, t]] + eps * -logp[b, t].mean()
                       for b in range(2) for t in range(5) if valid[b, t]) / n
        assert ours == pytest.approx(float(explicit), rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_head_loss_equals_full_and_stays_chunked(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 7))
    labels[1, :4] = -100
    full = label_smoothed_ce(head(hidden), labels, 0.1).sum()
    g_full = torch.autograd.grad(full, [hidden, head.weight])
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        ours, hits = chunked_head_loss(hidden, labels, head, 0.1, chunk_size=chunk)
    g_ours = torch.autograd.grad(ours, [hidden, head.weight])
    assert float(ours.detach()) == pytest.approx(float(full.detach()), rel=1e-5)
    assert int(hits) == int((head(hidden).argmax(-1) == labels).sum())
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    n_valid = int((labels != -100).sum())
    if chunk < n_valid:  # the graph keeps the inputs of each chunk, never a chunk's (or all) logits
        assert max(sizes) < min(chunk, n_valid) * 50 or max(sizes) <= 50 * 8
        assert all(s < n_valid * 50 for s in sizes)


def naive_heads_ce(xs, weight, bias, targets, coefs, eps, softcap):
    """Full logits of every head, autograd through label_smoothed_ce: the reference."""
    total, sums, hits = 0.0, [], []
    for c, x in zip(coefs, xs):
        z = x @ weight.t() + (bias if bias is not None else 0.0)
        if softcap:
            z = softcap * torch.tanh(z / softcap)
        s = label_smoothed_ce(z, targets, eps).sum()
        total, sums, hits = total + c * s, [*sums, float(s)], [*hits, int((z.argmax(-1) == targets).sum())]
    return total, sums, hits


@pytest.mark.parametrize("eps, softcap, bias, chunk", [(0.0, None, False, 4), (0.1, None, True, 5), (0.1, 2.0, True, 3),
                                                       (0.0, 2.0, False, 100)])
def test_fused_heads_ce_loss_and_gradients_equal_full_logits(eps, softcap, bias, chunk):
    torch.manual_seed(0)
    weight = torch.randn(40, 6, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    xs = [torch.randn(11, 6, requires_grad=True) for _ in range(3)]
    xs[1] = xs[1].detach()  # a probe: no gradient to its rows
    targets = torch.randint(0, 40, (11,))
    targets[:3] = (xs[0][:3] @ weight.t()).argmax(-1)  # some hits
    coefs = [0.2, 0.3, 0.5]
    total, sums, hits = fused_heads_ce(xs, weight, b, targets, coefs, eps, chunk_size=chunk, softcap=softcap)
    ref, ref_sums, ref_hits = naive_heads_ce(xs, weight, b, targets, coefs, eps, softcap)
    assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert sums.tolist() == pytest.approx(ref_sums, rel=1e-5) and hits.tolist() == ref_hits
    assert not sums.requires_grad and not hits.requires_grad
    params = [weight, xs[0], xs[2], *([b] if bias else [])]
    ours = torch.autograd.grad(3.0 * total, params)  # the upstream gradient scales everything
    expected = torch.autograd.grad(3.0 * ref, params)
    for a, e in zip(ours, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_fused_heads_ce_keeps_no_logits_between_forward_and_backward():
    """The graph holds the gradients of W, b and the rows (what backward returns), never a chunk's logits."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 300)
    xs = [torch.randn(50, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        total, _, _ = fused_heads_ce(xs, head.weight, head.bias, torch.randint(0, 300, (50,)), [0.5, 0.5], 0.1,
                                     chunk_size=16)
    held = [t.numel() for t in (*total.grad_fn.grads[:2], *total.grad_fn.grads[2])]
    assert sizes == [] and sorted(held) == sorted([300 * 8, 300, 50 * 8, 50 * 8])
    total.backward()
    assert total.grad_fn.grads is None  # released after backward


def test_fused_heads_ce_bf16_and_without_grad():
    torch.manual_seed(0)
    weight, x = torch.randn(64, 16, dtype=torch.float64), torch.randn(20, 16, dtype=torch.float64)
    targets = torch.randint(0, 64, (20,))
    w16, x16 = weight.bfloat16().requires_grad_(), x.bfloat16().requires_grad_()
    total, sums, _ = fused_heads_ce([x16], w16, None, targets, [1.0], 0.1, chunk_size=7)
    total.backward()
    wr, xr = w16.detach().double().requires_grad_(), x16.detach().double().requires_grad_()
    ref, _, _ = naive_heads_ce([xr], wr, None, targets, [1.0], 0.1, None)  # float64, same (rounded) inputs
    ref.backward()
    wb, xb = w16.detach().clone().requires_grad_(), x16.detach().clone().requires_grad_()
    naive16, _, _ = naive_heads_ce([xb], wb, None, targets, [1.0], 0.1, None)  # autograd on bf16 logits
    naive16.backward()
    assert float(total) == pytest.approx(float(ref), rel=2e-3)
    assert w16.grad.dtype == torch.bfloat16 and x16.grad.dtype == torch.bfloat16
    for ours, bf16, exact in [(w16.grad, wb.grad, wr.grad), (x16.grad, xb.grad, xr.grad)]:
        err, err16 = (ours.double() - exact).abs().max(), (bf16.double() - exact).abs().max()
        assert err <= 1e-2 * exact.abs().max() and err <= 1.5 * err16  # bf16 level, no worse than plain autograd
    with torch.no_grad():
        again, sums2, _ = fused_heads_ce([x16], w16, None, targets, [1.0], 0.1, chunk_size=7)
    assert again.grad_fn is None and torch.equal(sums, sums2)


# ------------------------------------------------------------------ trainers against explicit formulas


def explicit_causal(model, batch, options, weights):
    """Σ_k w_k CE_ls(head_k(h_k)[:, :-1], labels[:, 1:]) / n from output_hidden_states."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    L = model.config.num_hidden_layers
    norm, lm = model.model.norm, model.lm_head
    labels = batch["labels"][:, 1:]
    n = (labels != -100).sum()
    total = 0.0
    for layer, w in zip([*options.layers, L], weights):
        if layer == L:
            logits = out.logits  # hidden_states[-1] is already final-normed: the model's own logits
        elif options.head == "shared":
            logits = lm(norm(out.hidden_states[layer]))
        else:
            h = out.hidden_states[layer]
            logits = model.decred_heads.heads[str(layer)](norm(h) if options.final_norm else h)
        total = total + w * LabelSmoother(options.label_smoothing)({"logits": logits}, batch["labels"], shift_labels=True) * n
    return total / n


@pytest.mark.parametrize("head, final_norm, eps", [("separate", False, 0.1), ("separate", True, 0.0),
                                                   ("shared", False, 0.1)])
def test_sft_loss_equals_formula(tmp_path, head, final_norm, eps):
    tok = build_char_tokenizer()
    model = tiny()
    options = DeCREDOptions(layers=[1, 3], head=head, final_norm=final_norm, init="random",
                            weights=[0.2, 0.3, 0.5], label_smoothing=eps, chunk_size=4)
    trainer = DeCREDSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_list(ROWS),
                               processing_class=tok, decred=options)
    batch = causal_batch(tok)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    ref = explicit_causal(model, batch, options, [0.2, 0.3, 0.5])
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    if head == "shared":
        assert len(list(model.decred_heads.parameters())) == 0


@pytest.mark.parametrize("head, final_norm, eps", [("separate", True, 0.1), ("shared", False, 0.1), ("separate", False, 0.0)])
def test_sft_gradients_equal_formula(tmp_path, head, final_norm, eps):
    """Gradients of every parameter (body, LM head, aux heads) through the fused heads' CE equal
    autograd through the full logits (label smoothing, prompt and padding labels ignored)."""
    tok = build_char_tokenizer()
    model = tiny()
    options = DeCREDOptions(layers=[1, 3], head=head, final_norm=final_norm, init="random",
                            weights=[0.2, 0.3, 0.5], label_smoothing=eps, chunk_size=3)
    trainer = DeCREDSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_list(ROWS),
                               processing_class=tok, decred=options)
    assert all(trainer.decred._projection(l) is not None for l in (1, 3, 4))  # the fused path, not the fallback
    batch = causal_batch(tok)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = torch.autograd.grad(trainer.compute_loss(trainer.model, dict(batch)), params, allow_unused=True)
    ref = torch.autograd.grad(explicit_causal(model, batch, options, [0.2, 0.3, 0.5]), params, allow_unused=True)
    assert sum(g is not None for g in ours) == sum(g is not None for g in ref) > 0
    for (name, _), a, b in zip(model.named_parameters(), ours, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_scaled_weights_and_curriculum_in_loss(tmp_path):
    tok = build_char_tokenizer()
    model = tiny()
    options = DeCREDOptions(layers=[1, 2], head="shared", scale="sum_l", curriculum="rotational")
    trainer = DeCREDSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_list(ROWS),
                               processing_class=tok, decred=options)
    batch = causal_batch(tok)
    trainer.state.global_step, trainer.state.max_steps = 1, 10  # step 1: blocks 1, 2 rolled to 2, 3 (+ final 4)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    wide = DeCREDOptions(layers=[1, 2, 3], head="shared")  # explicit_causal reads layers from its options
    ref = explicit_causal(model, batch, wide, [0, 2 / 16, 5 / 16, 9 / 16])
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    round_robin = DeCREDOptions(layers=[1, 2, 3], head="shared", scale="sum_l", curriculum="round_robin", rotation=2)
    trainer = DeCREDSFTTrainer(model=model, args=sft_args(tmp_path), train_dataset=Dataset.from_list(ROWS),
                               processing_class=tok, decred=round_robin)
    trainer.state.global_step, trainer.state.max_steps = 1, 10  # round robin, step 1: only the head at block 2
    ours = trainer.compute_loss(trainer.model, dict(batch))
    ref = explicit_causal(model, batch, round_robin, [0, 2 / 8, 0, 6 / 8])
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)


def tiny_t5():
    """A tiny T5 in eval mode (no dropout: the formula checks compare two forwards)."""
    return build_tiny_model(TinyModelSpec(family="t5", layers=3, hidden=32, heads=2, intermediate=64)).eval()


def seq2seq_batch(tok, model):
    src = tok(["12+34=", "7+5="], add_special_tokens=False, padding=True, return_tensors="pt")
    labels = torch.tensor([[tok.convert_tokens_to_ids(c) for c in "46"] + [tok.eos_token_id],
                           [tok.convert_tokens_to_ids("1"), tok.eos_token_id, -100]])
    return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"], "labels": labels}


def seq2seq_trainer(tmp_path, model, tok, options, **kw):
    rows = Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [8, 2]}] * 8)
    from transformers import DataCollatorForSeq2Seq

    return DeCREDSeq2SeqTrainer(model=model, args=seq2seq_args(sft_args(tmp_path, **kw)), train_dataset=rows,
                                data_collator=DataCollatorForSeq2Seq(tok, model=model), processing_class=tok,
                                decred=options)


@pytest.mark.parametrize("head", ["separate", "shared"])
def test_seq2seq_loss_equals_formula_no_shift(tmp_path, head):
    tok = build_char_tokenizer()
    tok.padding_side = "right"
    model = tiny_t5()
    options = DeCREDOptions(layers=[2], head=head, weights=[0.3, 0.7], label_smoothing=0.1)
    trainer = seq2seq_trainer(tmp_path, model, tok, options)
    batch = seq2seq_batch(tok, model)
    ours = trainer.compute_loss(trainer.model, dict(batch))
    out = model(**batch, output_hidden_states=True)  # labels -> decoder_input_ids, no shift of the loss
    h = out.decoder_hidden_states[2]
    aux_logits = (model.decred_heads.heads["2"](h) if head == "separate"
                  else model.lm_head(model.decoder.final_layer_norm(h) * model.config.d_model**-0.5))
    smoother = LabelSmoother(0.1)
    ref = 0.3 * smoother({"logits": aux_logits}, batch["labels"]) + 0.7 * smoother(out, batch["labels"])
    assert float(ours) == pytest.approx(float(ref), rel=1e-5)
    if head == "separate":  # initialised from the LM head with T5's output scaling folded in
        torch.testing.assert_close(model.decred_heads.heads["2"](h), model.lm_head(h * model.config.d_model**-0.5))


def assert_training_lowers_loss(trainer, model, batch):
    """The trainer's own loss on ``batch`` is lower after ``trainer.train()`` than before."""
    with torch.no_grad():
        before = float(trainer.compute_loss(model, dict(batch)))
    trainer.train()
    with torch.no_grad():
        after = float(trainer.compute_loss(model, dict(batch)))
    assert after < before


def test_decoder_only_and_seq2seq_train(tmp_path):
    tok = build_char_tokenizer()
    model = tiny()
    batch = causal_batch(tok)
    reg_opts = DeCREDOptions(layers=[2], weights=[0.3, 0.7])
    trainer = DeCREDSFTTrainer(model=model, args=sft_args(tmp_path / "a", max_steps=8),
                               train_dataset=Dataset.from_list(ROWS), processing_class=tok, decred=reg_opts)
    before_head = model.decred_heads.heads["2"].weight.detach().clone()
    assert_training_lowers_loss(trainer, model, batch)
    assert not torch.equal(before_head, model.decred_heads.heads["2"].weight)
    logged = [h for h in trainer.state.log_history if "decred/loss_l2" in h]
    assert logged and all(math.isfinite(h["decred/loss_final"]) for h in logged)

    tok.padding_side = "right"
    t5 = tiny_t5()
    rows = Dataset.from_list([{"input_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"],
                               "labels": tok(r["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]}
                              for r in ROWS])
    from transformers import DataCollatorForSeq2Seq

    s2s = DeCREDSeq2SeqTrainer(model=t5, args=seq2seq_args(sft_args(tmp_path / "b", max_steps=8)), train_dataset=rows,
                               data_collator=DataCollatorForSeq2Seq(tok, model=t5), processing_class=tok, decred=reg_opts)
    assert_training_lowers_loss(s2s, t5, seq2seq_batch(tok, t5))


# ------------------------------------------------------------------ save / load / export


def test_save_load_round_trip_and_strip(tmp_path):
    tok = build_char_tokenizer()
    model = tiny()
    options = DeCREDOptions(layers=[1, 2], weights=[0.2, 0.2, 0.6], label_smoothing=0.1, final_norm=True)
    trainer = DeCREDSFTTrainer(model=model, args=sft_args(tmp_path, max_steps=2), train_dataset=Dataset.from_list(ROWS),
                               processing_class=tok, decred=options)
    trainer.train()
    batch = causal_batch(tok)
    model.eval()
    with torch.no_grad():
        before = float(trainer.compute_loss(model, dict(batch)))
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = from_pretrained_with_heads(tmp_path / "saved")
    reloaded.eval()
    reg = DeCREDRegularizer(reloaded, options)
    with torch.no_grad(), reg.capture():
        reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = reg.head_losses(batch["labels"], shift=True)
    n = (batch["labels"][:, 1:] != -100).sum()
    after = sum(w * losses[l][0] for l, w in zip([1, 2, 4], [0.2, 0.2, 0.6])) / n
    assert float(after) == pytest.approx(before, rel=1e-6)
    for name, p in model.decred_heads.state_dict().items():
        torch.testing.assert_close(reloaded.decred_heads.state_dict()[name], p)

    # export without heads: plain checkpoint, nothing DeCRED left in it, heads kept in memory
    trainer.decred_options.export_heads = False
    trainer.save_model(str(tmp_path / "export"))
    from safetensors.torch import load_file

    assert not any(k.startswith("decred_heads") for k in load_file(str(tmp_path / "export" / "model.safetensors")))
    assert "decred" not in (tmp_path / "export" / "config.json").read_text()
    assert from_pretrained_with_heads(tmp_path / "export").__dict__["_modules"].get("decred_heads") is None
    assert hasattr(model, "decred_heads") and hasattr(model.config, "decred")


# ------------------------------------------------------------------ decode time, internal LM


def test_averaged_logits_and_generate():
    tok = build_char_tokenizer()
    model = tiny()
    options = DeCREDOptions(layers=[2], weights=[0.3, 0.7])
    from trainers.decred import attach_heads

    attach_heads(model, options)
    batch = causal_batch(tok)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        aux = model.decred_heads.heads["2"](out.hidden_states[2])
        with averaged_logits(model, [0.0, 1.0]):
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, out.logits)
        with averaged_logits(model, [0.3, 0.7]):
            mixed = model(input_ids=ids, attention_mask=mask).logits
            generated = model.generate(input_ids=ids[:1, :6], max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(mixed, 0.3 * aux + 0.7 * out.logits)
    # greedy decoding under averaging picks the argmax of the mixed logits
    with torch.no_grad():
        step0 = 0.3 * model.decred_heads.heads["2"](model(input_ids=ids[:1, :6], output_hidden_states=True).hidden_states[2][:, -1]) \
            + 0.7 * model(input_ids=ids[:1, :6]).logits[:, -1]
    assert int(generated[0, 6]) == int(step0.argmax())
    assert model(input_ids=ids).logits.shape == out.logits.shape  # hooks removed


def _explicit_ilm(model, batch, head_of_layer, mute):
    """Per-head mean over utterances of exp(mean CE), from the full model run on its real encoder
    output with every cross-attention muted by ``mute`` (a context manager): the reference's
    internal LM, computed without the decoder-alone path."""
    labels = batch["labels"]
    with torch.no_grad(), mute(model):
        out = model(**{k: v for k, v in batch.items() if k != "labels"},
                    decoder_input_ids=model.prepare_decoder_input_ids_from_labels(labels=labels),
                    output_hidden_states=True)
    report = {}
    for name, fn in head_of_layer(out).items():
        logits = fn()
        ppls = []
        for b in range(labels.shape[0]):
            keep = labels[b] != -100
            ce = torch.nn.functional.cross_entropy(logits[b][keep], labels[b][keep])
            ppls.append(math.exp(float(ce.detach())))
        report[name] = sum(ppls) / len(ppls)
    return report


def _mute_t5_cross_attention(model):
    """T5LayerCrossAttention returns ``hidden + attention``: make it return ``hidden`` (skip)."""
    import contextlib

    @contextlib.contextmanager
    def ctx(m):
        blocks = [blk.layer[1] for blk in m.decoder.block]
        handles = [c.register_forward_hook(lambda mod, args, kwargs, out: (kwargs.get("hidden_states", args[0] if args else None),) + tuple(out[1:]),
                                           with_kwargs=True) for c in blocks]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return ctx


def _mute_gpt2_cross_attention(model):
    """GPT-2 adds ``crossattention(...)[0]`` to the residual stream: make it add zeros."""
    import contextlib

    @contextlib.contextmanager
    def ctx(m):
        handles = [blk.crossattention.register_forward_hook(lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:]))
                   for blk in m.decoder.transformer.h]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return ctx


def test_internal_lm_perplexity_seq2seq():
    tok = build_char_tokenizer()
    tok.padding_side = "right"
    model = tiny_t5()
    options = DeCREDOptions(layers=[2], weights=[0.3, 0.7])
    from trainers.decred import attach_heads

    attach_heads(model, options)
    torch.nn.init.normal_(model.decred_heads.heads["2"].weight)  # not a copy of the LM head
    batch = seq2seq_batch(tok, model)
    normal = evaluate_heads(model, [batch], options)
    ilm = evaluate_heads(model, [batch], options, internal_lm=True)
    assert set(normal) == set(ilm) == {"loss_l2", "ppl_l2", "loss_final", "ppl_final"}
    # reference: cross-attention skipped (the full model with its cross-attention sub-layers
    # muted), mean over utterances of exp(mean CE)
    ref = _explicit_ilm(model, batch, lambda out: {
        "ppl_final": lambda: out.logits,
        "ppl_l2": lambda: model.decred_heads.heads["2"](out.decoder_hidden_states[2])}, _mute_t5_cross_attention(model))
    assert ilm["ppl_final"] == pytest.approx(ref["ppl_final"], rel=1e-5)
    assert ilm["ppl_l2"] == pytest.approx(ref["ppl_l2"], rel=1e-5)
    # the per-utterance mean differs from the token-pooled exp(loss)
    assert ilm["ppl_final"] != pytest.approx(math.exp(ilm["loss_final"]), rel=1e-4)
    assert ilm["loss_final"] != pytest.approx(normal["loss_final"])
    # the earlier variant, kept as "zero_state": one all-zero encoder state, exp of the token mean
    from transformers.modeling_outputs import BaseModelOutput

    zero = evaluate_heads(model, [batch], options, internal_lm="zero_state")
    with torch.no_grad():
        zeros = BaseModelOutput(last_hidden_state=torch.zeros(2, 1, 32))
        logits = model(encoder_outputs=zeros, labels=batch["labels"]).logits
    pooled = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100)
    assert zero["loss_final"] == pytest.approx(float(pooled), rel=1e-5)
    assert zero["ppl_final"] == pytest.approx(math.exp(float(pooled)), rel=1e-5)
    # T5's attention has no biases: a zero encoder state gives zero cross-attention output, so
    # here (not for GPT-2, below) the two token means agree
    assert zero["loss_final"] == pytest.approx(ilm["loss_final"], rel=1e-5)
    with pytest.raises(ValueError, match="internal_lm"):
        evaluate_heads(model, [batch], options, internal_lm="zeros")


def test_internal_lm_speech_decoder_skips_cross_attention():
    tok = build_char_tokenizer()
    model = tiny_speech(len(tok))
    options = DeCREDOptions(layers=[2], weights=[0.3, 0.7], ctc_weight=0.3)
    from trainers.decred import attach_heads

    attach_heads(model, options)
    torch.manual_seed(2)
    for block in model.decoder.transformer.h:  # trained biases are not zero (fresh ones are)
        for proj in (block.crossattention.c_attn, block.crossattention.q_attn, block.crossattention.c_proj):
            torch.nn.init.normal_(proj.bias, std=0.5)
    batch = {"input_values": torch.randn(2, 1600), "attention_mask": torch.ones(2, 1600, dtype=torch.long),
             "labels": torch.tensor([[10, 11, 12, 2], [13, 14, 2, -100]])}
    ilm = evaluate_heads(model, [batch], options, internal_lm=True)
    ref = _explicit_ilm(model, batch, lambda out: {
        "ppl_final": lambda: out.logits,
        "ppl_l2": lambda: model.decred_heads.heads["2"](out.decoder_hidden_states[2])}, _mute_gpt2_cross_attention(model))
    assert ilm["ppl_final"] == pytest.approx(ref["ppl_final"], rel=1e-5)
    assert ilm["ppl_l2"] == pytest.approx(ref["ppl_l2"], rel=1e-5)
    normal = evaluate_heads(model, [batch], options)
    assert normal["loss_final"] != pytest.approx(ilm["loss_final"])  # the encoder does matter
    # GPT-2's cross-attention projections have biases: a zero encoder state still adds a constant
    zero = evaluate_heads(model, [batch], options, internal_lm="zero_state")
    assert zero["loss_final"] != pytest.approx(ilm["loss_final"], rel=1e-4)


def _mute_bart_cross_attention(model):
    """BART's cross-attention sub-layer is ``LN(hidden + attention)`` (post-LN): make it the
    identity (attention adds zeros, the norm passes its input through), i.e. skip it."""
    import contextlib

    @contextlib.contextmanager
    def ctx(m):
        handles = []
        for layer in m.model.decoder.layers:
            handles.append(layer.encoder_attn.register_forward_hook(
                lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:])))
            handles.append(layer.encoder_attn_layer_norm.register_forward_hook(lambda mod, args, out: args[0]))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
    return ctx


def test_internal_lm_bart_skips_the_cross_attention_sublayer():
    from transformers import BartConfig, BartForConditionalGeneration

    tok = build_char_tokenizer()
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=tok.pad_token_id, bos_token_id=1, eos_token_id=tok.eos_token_id,
                        decoder_start_token_id=1, forced_eos_token_id=None)
    torch.manual_seed(3)
    model = BartForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.final_logits_bias)  # the logit bias must be in both paths
    for layer in model.model.decoder.layers:  # trained norms are not the identity on normed input
        torch.nn.init.normal_(layer.encoder_attn_layer_norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(layer.encoder_attn_layer_norm.bias, 0.0, 0.3)
    options = DeCREDOptions(layers=[2], weights=[0.3, 0.7])
    from trainers.decred import attach_heads

    attach_heads(model, options)
    batch = seq2seq_batch(tok, model)
    ilm = evaluate_heads(model, [batch], options, internal_lm=True)
    ref = _explicit_ilm(model, batch, lambda out: {
        "ppl_final": lambda: out.logits,
        "ppl_l2": lambda: model.decred_heads.heads["2"](out.decoder_hidden_states[2])}, _mute_bart_cross_attention(model))
    assert ilm["ppl_final"] == pytest.approx(ref["ppl_final"], rel=1e-5)
    assert ilm["ppl_l2"] == pytest.approx(ref["ppl_l2"], rel=1e-5)


# ------------------------------------------------------------------ speech + CTC


def tiny_speech(vocab):
    enc = Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         conv_dim=[16, 16], conv_kernel=[10, 3], conv_stride=[5, 4], num_conv_pos_embeddings=8,
                         num_conv_pos_embedding_groups=2)
    dec = GPT2Config(n_embd=32, n_layer=3, n_head=2, vocab_size=vocab, is_decoder=True, add_cross_attention=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = SpeechEncoderDecoderModel(encoder=Wav2Vec2Model(enc), decoder=GPT2LMHeadModel(dec))
    model.config.decoder_start_token_id, model.config.pad_token_id, model.config.eos_token_id = 1, 0, 2
    return model.eval()  # no dropout / SpecAugment for the formula check (Trainer.train switches it on)


def test_speech_ctc_hybrid_loss_on_random_features(tmp_path):
    tok = build_char_tokenizer()
    model = tiny_speech(len(tok))
    options = DeCREDOptions(layers=[2], weights=[0.3, 0.7], label_smoothing=0.1, ctc_weight=0.3)
    rows = Dataset.from_list([{"input_values": torch.randn(1600).tolist(), "labels": [10, 11, 12, 2]}] * 8)

    def collate(batch):
        return {"input_values": torch.tensor([r["input_values"] for r in batch]),
                "attention_mask": torch.ones(len(batch), 1600, dtype=torch.long),
                "labels": torch.tensor([r["labels"] for r in batch])}

    trainer = DeCREDSeq2SeqTrainer(model=model, args=seq2seq_args(sft_args(tmp_path, max_steps=3, remove_unused_columns=False)),
                                   train_dataset=rows, data_collator=collate, processing_class=tok, decred=options)
    torch.manual_seed(1)
    x = torch.randn(2, 1600)
    x[1, 1200:] = 0
    mask = torch.ones(2, 1600, dtype=torch.long)
    mask[1, 1200:] = 0
    labels = torch.tensor([[10, 11, 12, 2], [13, 14, 2, -100]])
    batch = {"input_values": x, "attention_mask": mask, "labels": labels}
    ours = trainer.compute_loss(model, dict(batch))

    out = model(input_values=x, attention_mask=mask, labels=labels, output_hidden_states=True)
    smoother = LabelSmoother(0.1)
    h = out.decoder_hidden_states[2]
    attention = 0.3 * smoother({"logits": model.decred_heads.heads["2"](h)}, labels) + 0.7 * smoother(out, labels)
    enc = model.encoder(x, attention_mask=mask).last_hidden_state
    lengths = model.encoder._get_feat_extract_output_lengths(mask.sum(-1))
    logp = model.decred_heads.ctc(enc).log_softmax(-1)
    ctc = torch.nn.functional.ctc_loss(logp.transpose(0, 1), torch.tensor([10, 11, 12, 13, 14]), lengths,
                                       torch.tensor([3, 2]), blank=0, reduction="mean", zero_infinity=True)
    assert float(ours) == pytest.approx(float(0.3 * ctc + 0.7 * attention), rel=1e-5)

    before = model.decred_heads.ctc.weight.detach().clone()
    trainer.train()
    assert not torch.equal(before, model.decred_heads.ctc.weight)
    assert any("decred/ctc" in h for h in trainer.state.log_history)


# ------------------------------------------------------------------ RLIF / GRPO


def test_rlif_aux_loss_runs_a_step(tmp_path, tiny_model_dir):
    from rewards import MathAccuracy
    from tests.test_rlif import make_trainer
    from trainers.decred import DeCREDRLIFTrainer

    class Trainer(DeCREDRLIFTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, decred=DeCREDOptions(layers=[1], weights=[0.5, 1.0], label_smoothing=0.1), **kwargs)

    trainer = make_trainer(tiny_model_dir, tmp_path, [MathAccuracy()], trainer_cls=Trainer, max_steps=1)
    head = trainer.model.decred_heads.heads["1"].weight.detach().clone()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "decred/aux_loss" in h]
    assert logged and math.isfinite(logged[0]["decred/aux_loss"]) and logged[0]["decred/aux_loss"] > 0
    assert "decred/loss_final" not in logged[0]  # the final head is GRPO's
    assert not torch.equal(head, trainer.model.decred_heads.heads["1"].weight)


# ------------------------------------------------------------------ recipe under DDP


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_decred_recipe_under_two_processes(tmp_path, tiny_model_dir, engine):
    """Heads used by the loss reach DDP through the model's output (find_unused_parameters on); under
    ZeRO-2 and ZeRO-3 (every parameter sharded, heads built from the partitioned LM head) they train,
    are gathered into the saved model and reload; the main process evaluates a whole copy."""
    from safetensors.torch import load_file

    from tests.launcher import deepspeed_variant, launch_recipe

    if engine == "zero3":
        engine = deepspeed_variant("zero3", tmp_path / "launch", stage3_param_persistence_threshold=0)
    out = tmp_path / "decred_run"
    launch_recipe("decred", "configs/decred/tiny_decoder_only.yaml", engine, f"model.name_or_path={tiny_model_dir}",
               "decred.layers=[1]", "compare_baseline=false", "trainer.max_steps=2", "trainer.logging_steps=1",
               "trainer.per_device_train_batch_size=8", f"trainer.output_dir={out}", "eval.max_rows=8",
               "eval.before_training=false", "head_eval_rows=8")
    weights = load_file(str(out / "model.safetensors"))
    assert "decred_heads.heads.1.weight" in weights
    from trainers.decred import from_pretrained_with_heads

    reloaded = from_pretrained_with_heads(out)
    head = reloaded.decred_heads.heads["1"].weight
    assert head.shape == reloaded.get_output_embeddings().weight.shape and torch.isfinite(head).all()
    assert torch.equal(head, weights["decred_heads.heads.1.weight"].to(head.dtype))
    report = json.loads((out / "heads.json").read_text())["decred"]
    assert {"loss_l1", "loss_final"} <= set(report) and all(math.isfinite(v) for v in report.values())
