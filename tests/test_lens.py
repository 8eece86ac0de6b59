"""Logit lens / internal consistency: hooks + chunked readout against full ``output_hidden_states``."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, T5Config, T5ForConditionalGeneration

from rewards import ConsistencyVote, InternalConsistency
from trainers.lens import (LABEL_SETS, LogitLens, agreement, answer_token_indices, calibrated_agreement, calibrated_votes,
                          group_candidates, lens_modules, per_completion)

VOCAB = 48


def tiny(family="qwen2", tied=False, layers=4, vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    cls, config = {"qwen2": (Qwen2ForCausalLM, Qwen2Config), "llama": (LlamaForCausalLM, LlamaConfig)}[family]
    model = cls(config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)).eval()
    with torch.no_grad():  # a norm that is not the identity, so norming twice would show
        model.model.norm.weight.uniform_(0.5, 2.0)
    return model


def trl_batch(seed=0, rows=5, vocab=VOCAB):
    """TRL's layout: prompts left-padded, completions right-padded; answer indices per row."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, completion_lens = [3, 5, 2, 4, 5][:rows], [4, 2, 6, 5, 1][:rows]
    p, c = max(prompt_lens), max(completion_lens)
    ids = torch.zeros(rows, p + c, dtype=torch.long)
    mask = torch.zeros(rows, p + c, dtype=torch.long)
    for r, (a, b) in enumerate(zip(prompt_lens, completion_lens)):
        ids[r, p - a : p + b] = torch.randint(1, vocab, (a + b,), generator=g)
        mask[r, p - a : p + b] = 1
    indices = [[0, 2, 3], [1], [2, 3, 4, 5], [], [0]]
    return ids, mask, c, indices[:rows]


@torch.no_grad()
def naive(model, ids, mask, c, indices, layers, vocab):
    """Full hidden states -> full logits at every layer; last entry used as is (already normed)."""
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    n = len(hs) - 1
    norm, head = model.get_base_model().model.norm if hasattr(model, "get_base_model") else model.model.norm, \
        model.get_output_embeddings()
    logits = {l: head(hs[l] if l == n else norm(hs[l])).double()[..., :vocab] for l in layers}
    rows = [(r, ids.shape[1] - c - 1 + t, ids[r, ids.shape[1] - c + t]) for r, idx in enumerate(indices) for t in idx]
    hard, soft, full = [], [], []
    for r, pos, y in rows:
        final = logits[n][r, pos].argmax()
        hard.append([float(logits[l][r, pos].argmax() == final) for l in layers])
        soft.append([float(logits[l][r, pos].softmax(-1)[y]) for l in layers])
        full.append(torch.stack([logits[l][r, pos] for l in layers]))
    return torch.tensor(hard), torch.tensor(soft, dtype=torch.float64), torch.stack(full) if full else None, torch.tensor([y for *_, y in rows])


def captured(model, lens, ids, mask, c, indices, micro=2):
    lens.arm(indices, c)
    with torch.no_grad():
        for start in range(0, ids.shape[0], micro):  # micro-batches, like TRL's scoring loop
            model(input_ids=ids[start : start + micro], attention_mask=mask[start : start + micro])
    return lens.collect()


@pytest.mark.parametrize("family,tied,layers", [("qwen2", False, None), ("qwen2", True, [1, 2, 3, 4]),
                                                ("llama", False, [2]), ("llama", True, [1, 3])])
@pytest.mark.parametrize("padded_vocab", [False, True])
def test_hooks_match_output_hidden_states(family, tied, layers, padded_vocab):
    model = tiny(family, tied)
    vocab = VOCAB - 8 if padded_vocab else VOCAB  # a head padded past the tokenizer, like Qwen's
    lens = LogitLens(model, layers, vocab_size=vocab)
    ids, mask, c, indices = trl_batch(vocab=vocab)
    states, counts = captured(model, lens, ids, mask, c, indices)
    assert counts == [len(i) for i in indices] and states.shape == (len(lens.layers), sum(counts), 32)
    hard, soft, _, emitted = naive(model, ids, mask, c, indices, lens.layers, vocab)
    ours = lens.readout(states, emitted, modes=("hard", "soft"), token_chunk=3, vocab_chunk=7)
    assert torch.equal(ours["hard"], hard.float())
    torch.testing.assert_close(ours["soft"].double(), soft, atol=1e-5, rtol=1e-4)
    assert (ours["hard"][:, -1] == 1).all()


def test_last_layer_is_the_models_own_prediction_not_normed_twice():
    model = tiny()
    lens = LogitLens(model, [4])
    ids, mask, c, indices = trl_batch()
    states, _ = captured(model, lens, ids, mask, c, indices)
    _, _, _, emitted = naive(model, ids, mask, c, indices, [4], VOCAB)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.double()
    own = torch.tensor([float(logits[r, ids.shape[1] - c - 1 + t].softmax(-1)[ids[r, ids.shape[1] - c + t]])
                        for r, idx in enumerate(indices) for t in idx], dtype=torch.float64)
    torch.testing.assert_close(lens.readout(states, emitted, modes=("soft",))["soft"][:, 0].double(), own, atol=1e-5,
                               rtol=1e-4)
    twice = model.model.norm(model.model.norm(states[0]))  # the mistake this guards against changes the numbers
    assert not torch.allclose(model.lm_head(twice).softmax(-1), model.lm_head(model.model.norm(states[0])).softmax(-1))


def test_argmax_never_picks_padded_head_rows():
    model = tiny()
    with torch.no_grad():  # padding rows that would win every argmax
        model.lm_head.weight[VOCAB - 8 :] = 50 * model.lm_head.weight[:1].abs().sign()
    lens = LogitLens(model, [1, 2, 3, 4], vocab_size=VOCAB - 8)
    ids, mask, c, indices = trl_batch(vocab=VOCAB - 8)
    states, _ = captured(model, lens, ids, mask, c, indices)
    from trainers.lens import lens_readout

    stats = lens_readout(states, lens.norm, model.lm_head.weight, None, torch.zeros(states.shape[1], dtype=torch.long),
                         vocab_size=VOCAB - 8, vocab_chunk=5)
    unrestricted = lens_readout(states, lens.norm, model.lm_head.weight, None,
                                torch.zeros(states.shape[1], dtype=torch.long), vocab_chunk=5)
    assert (stats["argmax"] < VOCAB - 8).all() and (unrestricted["argmax"] >= VOCAB - 8).any()


def test_peft_wrapped_model_reads_through_the_adapters():
    model = get_peft_model(tiny(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    lens = LogitLens(model)
    ids, mask, c, indices = trl_batch()
    states, _ = captured(model, lens, ids, mask, c, indices)
    hard, soft, _, emitted = naive(model, ids, mask, c, indices, lens.layers, VOCAB)
    ours = lens.readout(states, emitted, modes=("hard", "soft"))
    assert torch.equal(ours["hard"], hard.float())
    torch.testing.assert_close(ours["soft"].double(), soft, atol=1e-5, rtol=1e-4)


def test_candidates_mode_matches_an_explicit_calibrated_vote():
    model = tiny()
    lens = LogitLens(model, [2, 3, 4])
    ids, mask, c, indices = trl_batch()
    states, counts = captured(model, lens, ids, mask, c, indices)
    _, _, full, emitted = naive(model, ids, mask, c, indices, lens.layers, VOCAB)
    candidates = torch.tensor([[int(y), (int(y) + k) % VOCAB, -1 if k % 2 else (int(y) + 3) % VOCAB]
                               for k, y in enumerate(emitted)])
    ours = lens.readout(states, emitted, modes=("candidates",), candidates=candidates)["candidates"]
    # explicit: restricted softmax, per-layer per-token median thresholds, argmax
    expected = torch.zeros(len(emitted), len(lens.layers))
    for k in range(len(lens.layers)):
        probs = []
        for n in range(len(emitted)):
            present = [int(t) for t in candidates[n] if t >= 0]
            probs.append(dict(zip(present, full[n, k, present].softmax(-1).tolist())))
        for n in range(len(emitted)):
            def score(t):
                pool = torch.tensor([p[t] for p in probs if t in p], dtype=torch.float64)
                return probs[n][t] - float(torch.quantile(pool, 0.5))
            vote = max(probs[n], key=score)
            expected[n, k] = float(vote == int(emitted[n]))
    assert torch.equal(ours, expected)


class LabelTokenizer:
    """Labels as single tokens: digits 1..10, '-' 11, choice letters 12..16 (ids inside the tiny vocabulary)."""

    unk_token_id = 0
    ids = {**{str(d): 1 + d for d in range(10)}, "-": 11, **{c: 12 + i for i, c in enumerate("ABCDE")}}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.ids.get(ch, 0) for ch in text]}

    def convert_tokens_to_ids(self, token):
        return self.ids.get(token, 0)


def naive_calibrated(logits, is_label):
    """Xie et al. by hand: softmax over the labels, per (layer, label) the (M-1)/M quantile by
    sorting and linear interpolation, scores 1 / 1/M / 0, the last layer's best score decides."""
    n, k, m = logits.shape
    rows = [i for i in range(n) if is_label[i]]
    probs = {i: [torch.softmax(logits[i, j].float(), -1).tolist() for j in range(k)] for i in rows}
    out = [[float("nan")] * k for _ in range(n)]

    def quantile(values, q):
        v = sorted(values)
        pos = q * (len(v) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(v) - 1)
        return v[lo] + (pos - lo) * (v[hi] - v[lo])

    thresholds = [[quantile([probs[i][j][c] for i in rows], (m - 1) / m) for c in range(m)] for j in range(k)]
    for i in rows:
        scores = [[1.0 if probs[i][j][c] > thresholds[j][c] else (1 / m if probs[i][j][c] == thresholds[j][c] else 0.0)
                   for c in range(m)] for j in range(k)]
        final = max(range(m), key=lambda c: (scores[-1][c], -c))  # best score, first label on ties
        out[i] = [scores[j][final] for j in range(k)]
    return torch.tensor(out)


@pytest.mark.parametrize("n", [12, 29])  # 12 positions: (M-1)/M * 11 = 10 lands on a sample, exercising the tie rule
def test_calibrated_agreement_matches_an_explicit_computation(n):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(n, 3, 11, generator=g) * 2
    index = torch.randint(0 if n == 12 else -1, 11, (n,), generator=g)  # -1: not a label
    ours = calibrated_agreement(logits, index)
    expected = naive_calibrated(logits, (index >= 0).tolist())
    torch.testing.assert_close(ours, expected, equal_nan=True)
    if n == 12:
        assert bool(((ours - 1 / 11).abs() < 1e-6).any())  # some tie scored 1/M


def test_calibrated_mode_through_the_lens_matches_full_logits():
    model = tiny()
    lens = LogitLens(model, [2, 3, 4], tokenizer=LabelTokenizer())
    ids, mask, c, indices = trl_batch()
    states, counts = captured(model, lens, ids, mask, c, indices)
    _, _, full, emitted = naive(model, ids, mask, c, indices, lens.layers, VOCAB)
    emitted = torch.tensor([1 + (i % 11) if i % 3 else 40 for i in range(len(emitted))])  # labels and non-labels
    label_ids = [LabelTokenizer.ids[ch] for ch in LABEL_SETS["calibrated"]]
    ours = lens.readout(states, emitted, modes=("calibrated",))["calibrated"]
    index = torch.tensor([label_ids.index(int(t)) if int(t) in label_ids else -1 for t in emitted])
    expected = naive_calibrated(full[:, :, label_ids], (index >= 0).tolist())
    torch.testing.assert_close(ours, expected, equal_nan=True)
    with pytest.raises(ValueError, match="needs the logit lens built with the tokenizer"):
        LogitLens(model, [2, 3, 4]).readout(states, emitted, modes=("calibrated",))


def test_unanimous_group_with_disagreeing_layers_scores_below_one():
    """Four completions all answer 7 (one token). The last layer backs 7 everywhere; the middle
    layers back other digits at some positions. ``candidates`` has one candidate per position, so
    it scores 1 whatever the layers say; the paper's calibration does not."""
    seven, m = 7, 11
    label_logits = torch.zeros(4, 3, m)
    label_logits[:, 2, seven] = torch.tensor([6.0, 5.0, 4.0, 3.0])       # last layer: 7, with varying confidence
    label_logits[:, 1, seven] = torch.tensor([4.0, 0.0, 3.0, 0.0])       # layer 2 agrees at positions 0 and 2
    label_logits[[1, 3], 1, 2] = 4.0                                     # ... and backs 2 at positions 1 and 3
    label_logits[:, 0, 5] = 3.0                                          # layer 1 backs 5 everywhere
    token = LabelTokenizer.ids[str(seven)]
    emitted = torch.full((4,), token)
    candidates = group_candidates(["q"] * 4, [[token]] * 4, [True] * 4)
    stats = {"argmax": torch.full((4, 3), token), "logp": torch.zeros(4, 3),
             "candidate_logits": label_logits[:, :, [seven]], "label_logits_calibrated": label_logits,
             "label_index_calibrated": torch.full((4,), seven)}
    values = agreement(stats, emitted, ("candidates", "calibrated"), candidates)
    signals = per_completion(values, [1] * 4, [2, 3, 4], [True] * 4)
    assert InternalConsistency("candidates")(["q"] * 4, ["7"] * 4, token_signals=signals) == [1.0] * 4
    calibrated = InternalConsistency("calibrated")(["q"] * 4, ["7"] * 4, token_signals=signals)
    expected = naive_calibrated(label_logits, [True] * 4).mean(-1).tolist()  # default layers 2, 3, 4: every column
    assert calibrated == pytest.approx(expected)
    assert max(calibrated) <= 1.0 and sum(calibrated) / 4 < 1.0


def test_calibrated_votes_single_candidate_and_quantile():
    logits = torch.tensor([[[0.0, float("-inf")]], [[1.0, 0.0]]])
    cands = torch.tensor([[4, -1], [4, 9]])
    # row 0 has one candidate: it votes for it. Row 1: 4 is below its median (1.0, 0.73), 9 at its own
    assert calibrated_votes(logits, cands).squeeze(1).tolist() == [4, 9]
    # quantile 0 (the minimum): both scores are 0 in row 1, and ties go to the first (own) candidate
    assert calibrated_votes(logits, cands, quantile=0.0).squeeze(1).tolist() == [4, 4]


def test_group_candidates_follow_consecutive_prompt_groups():
    out = group_candidates(["a", "a", "b"], [[1, 2], [3], [4]], [True, True, True])
    assert out.tolist() == [[1, 3], [2, -1], [3, 1], [4, -1]]


def test_unsupported_architecture_names_what_is_missing():
    model = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(TypeError, match="T5ForConditionalGeneration.*decoder layer list.*final norm"):
        lens_modules(model)


def test_layers_outside_the_model_are_refused():
    with pytest.raises(ValueError, match="must be in 1..4"):
        LogitLens(tiny(), [0, 5])


def test_answer_positions_with_the_tiny_tokenizer():
    from recipes.common.tiny.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    ids = tok("7+8=15. The answer is \\boxed{15}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    indices, found = answer_token_indices(tok, ids)
    assert found and tok.decode([ids[i] for i in indices]) == "15" and indices[0] == 4  # first emission
    indices, found = answer_token_indices(tok, tok("what?", add_special_tokens=False)["input_ids"] + [tok.eos_token_id], 2)
    assert not found and tok.decode([ids[i] for i in indices]) != "" and len(indices) == 2
    assert answer_token_indices(tok, tok("none", add_special_tokens=False)["input_ids"], None) == ([], False)
    # "4" inside "34" is not the first emission of the answer 4
    ids = tok("34-30=4", add_special_tokens=False)["input_ids"]
    assert answer_token_indices(tok, ids)[0] == [6]


def test_rewards_reduce_and_vote():
    rows = [{"ic_soft": torch.tensor([[0.5, 1.0]]), "ic_layers": [2, 3], "ic_answer_found": f} for f in (True, False)]
    assert InternalConsistency("soft")(["q", "q"], ["1", "2"], token_signals=rows) == [0.75, 0.75]
    assert InternalConsistency("soft", require_answer=True)(["q", "q"], ["1", "2"], token_signals=rows) == [0.75, None]
    with pytest.raises(ValueError, match="not read by the logit lens"):
        InternalConsistency("soft", layers=[1]).reduce(rows[0])
    with pytest.raises(ValueError, match="mode must be one of"):
        InternalConsistency("mean")
    ic = [{"ic_hard": torch.tensor([[v]]), "ic_layers": [1], "ic_answer_found": True} for v in (0.9, 0.2, 0.3, 0.0)]
    # plain majority would pick 5 (two votes); IC weights pick 4 (0.9 > 0.2 + 0.3); "?" never wins
    assert ConsistencyVote()(["q"] * 4, ["4", "5", "5", "?"], token_signals=ic) == [1.0, 0.0, 0.0, 0.0]


# -- in the RLIF trainer ------------------------------------------------------------------------

class LensProbe(InternalConsistency):
    """Records the lens signals it is given (and the completion ids)."""

    def __init__(self, mode="soft", layers=None):
        super().__init__(mode, layers)
        self.seen = []

    def __call__(self, prompts, completions, token_signals=None, completion_ids=None, **kw):
        self.seen.append((token_signals, completion_ids))
        return super().__call__(prompts, completions, token_signals=token_signals, **kw)


@pytest.mark.parametrize("num_iterations, capture_mib, extra", [(2, None, 0), (1, None, 0), (1, "0", 1)])
def test_trainer_lens_matches_naive_and_rides_on_trl_pass(tiny_model_dir, tmp_path, monkeypatch, num_iterations,
                                                          capture_mib, extra):
    """Riding on TRL's pass, read from generation's forwards (no pass added), or (capture off) one extra pass."""
    from tests.test_rlif import PROMPTS, count_scoring_passes, make_trainer

    if capture_mib is not None:
        monkeypatch.setenv("INTRINSIC_GENERATION_CAPTURE_MIB", capture_mib)

    soft, hard = LensProbe("soft", [1, 2]), LensProbe("hard")
    trainer = make_trainer(tiny_model_dir, tmp_path, [soft, hard, ConsistencyVote("candidates")],
                           num_iterations=num_iterations, per_device_train_batch_size=4, steps_per_generation=2,
                           gradient_accumulation_steps=2, log_signals=False, max_completion_length=8)
    assert trainer._lens.layers == [1, 2] and trainer.lens_modes == ("hard", "soft", "candidates")
    trainer.model.train()
    calls, handle = count_scoring_passes(trainer)
    inputs = [{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(2)]
    torch.manual_seed(0)
    trainer._generate_and_score_completions(inputs)
    handle.remove()
    assert len(calls) == (1 if num_iterations > 1 else 0) * 2 + extra * 2  # micro-batches of 4 over 8 rows
    signals, completion_ids = soft.seen[-1]
    # naive: full hidden states of the same (unchanged) model on TRL's layout
    tok = trainer._tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in (i["prompt"] for i in inputs)]
    from trainers.signals import pack_prompt_completion

    ids, mask, p = pack_prompt_completion(prompt_ids, completion_ids, tok.pad_token_id)
    indices = [answer_token_indices(tok, c, 4)[0] for c in completion_ids]
    n_hard, n_soft, _, _ = naive(trainer.model.eval(), ids, mask, ids.shape[1] - p, indices, [1, 2], len(tok))
    ours_soft = torch.cat([s["ic_soft"] for s in signals]).double()
    torch.testing.assert_close(ours_soft, n_soft, atol=1e-5, rtol=1e-4)
    assert torch.equal(torch.cat([s["ic_hard"] for s in hard.seen[-1][0]]), n_hard.float())
    assert all(s["ic_layers"] == [1, 2] for s in signals)
    assert trainer._metrics["train"]["signals/ic_answer_found"]


def test_short_run_with_internal_consistency_rewards(tiny_model_dir, tmp_path):
    from rewards import MathAccuracy
    from tests.test_rlif import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, [InternalConsistency(), ConsistencyVote(), MathAccuracy()],
                           reward_weights=[0.5, 0.5, 1.0], max_steps=2, log_signals=False)
    trainer.train()
    scored = [h for h in trainer.state.log_history if "rewards/internal_consistency/mean" in h]
    assert scored and all(0.0 <= h["rewards/internal_consistency/mean"] <= 1.0 for h in scored)
    assert all("rewards/consistency_vote/mean" in h and "signals/ic_answer_found" in h for h in scored)


def test_calibrated_mode_in_the_trainer_equals_the_evaluator_path(tiny_model_dir, tmp_path):
    """The trainer's reward call and ``token_signal_dicts`` (evaluator, verifier) calibrate over the
    same completions here, so they must give the same ``ic_calibrated``."""
    from tests.test_rlif import PROMPTS, make_trainer
    from trainers.signals import token_signal_dicts

    probe = LensProbe("calibrated", [1, 2])
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe], per_device_train_batch_size=4, steps_per_generation=2,
                           gradient_accumulation_steps=2, log_signals=False, max_completion_length=8)
    assert set(trainer._lens.label_sets) == {"calibrated", "calibrated_choices"}
    inputs = [{"prompt": p, "answer": "0"} for p in PROMPTS for _ in range(2)]
    torch.manual_seed(0)
    trainer._generate_and_score_completions(inputs)
    signals, completion_ids = probe.seen[-1]
    tok = trainer._tokenizer
    prompts = [i["prompt"] for i in inputs]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    again = token_signal_dicts(trainer.model.eval(), tok, prompt_ids, completion_ids, prompts, temperature=1.0,
                               lens_modes=("calibrated",), lens_layers=[1, 2])
    for ours, theirs in zip(signals, again):
        torch.testing.assert_close(ours["ic_calibrated"], theirs["ic_calibrated"], equal_nan=True, atol=1e-6, rtol=0)
        finite = ours["ic_calibrated"][~ours["ic_calibrated"].isnan()]
        assert all(float(v) in (0.0, 1.0) or abs(float(v) - 1 / 11) < 1e-6 for v in finite)
