"""Padded vocabulary rows: an LM head wider than the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens).

Sampling draws from every row, so a completion can hold an id ``>= len(tokenizer)``. Signals are
defined over the tokenizer's tokens; such a completion's internal rewards are skipped (``None``,
left out of its group, counted in ``signals/outside_vocab`` and ``signals/skipped``) and nothing
crashes. Here the padding rows are made likely with a positive bias on them.
"""

import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipes.common.evaluation import evaluate_model, internal_signals
from recipes.common.schema import EvalConfig
from rewards import InternalConsistency, NegativeEntropy, SelfCertainty
from trainers import RLIFConfig, RLIFTrainer
from trainers.lens import answer_token_indices
from trainers.signals import outside_vocab, token_signal_dicts
from recipes.common.verify import Verifier

EXTRA_ROWS = 8
PROMPTS = ["12+34=", "7+5=", "99+1=", "3+4="]


def padded_model(model_dir, bias=1.0):
    """The tiny model with ``EXTRA_ROWS`` head rows past its tokenizer, each with logit bias ``bias``."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    vocab = len(tok)
    model.resize_token_embeddings(vocab + EXTRA_ROWS, mean_resizing=False)
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, vocab + EXTRA_ROWS, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[vocab:] = bias
    model.config.tie_word_embeddings = False
    model.lm_head = head
    assert model.get_output_embeddings() is head
    return model, tok


def recording(cls, **kwargs):
    """An instance of ``cls`` (an internal reward) that keeps what it was given and what it returned."""

    class Recording(cls):
        name = cls.name  # same metric name
        abstract = True  # not registered: `name` must keep resolving to the real reward in other tests

        def __call__(self, prompts, completions, token_signals=None, **kw):
            out = super().__call__(prompts, completions, token_signals=token_signals, **kw)
            self.calls.append((token_signals, out))
            return out

    reward = Recording(**kwargs)
    reward.calls = []
    return reward


def all_nan(signals):
    tensors = [v for v in signals.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return bool(tensors) and all(bool(t.isnan().all()) for t in tensors if t.numel())


@pytest.mark.parametrize("reward_cls, kwargs", [(SelfCertainty, {}), (NegativeEntropy, {"last_k": 2}),
                                                (InternalConsistency, {"layers": [1, 2]})],
                         ids=["self_certainty", "negative_entropy", "internal_consistency"])
def test_rlif_trains_through_sampled_padding_rows(tiny_model_dir, tmp_path, reward_cls, kwargs):
    model, tok = padded_model(tiny_model_dir)
    reward = recording(reward_cls, **kwargs)
    args = RLIFConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=6, temperature=0.7, learning_rate=1e-3, bf16=False, use_cpu=True,
                      gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", seed=0,
                      max_steps=3)
    data = Dataset.from_dict({"prompt": PROMPTS * 8, "answer": ["46", "12", "100", "7"] * 8})
    trainer = RLIFTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=data, processing_class=tok)
    trainer.train()  # on main: "target ids must be in [0, 104) (vocab_size)" at the first step

    logs = [h for h in trainer.state.log_history if "signals/outside_vocab" in h]
    assert len(logs) == 3
    outside = [h["signals/outside_vocab"] for h in logs]
    assert sum(outside) > 0  # the padding rows were sampled
    assert [h["signals/skipped"] for h in logs] == outside  # the only weighted reward: each one is skipped
    # every skipped completion had all its signals NaN and got None; every other one a finite reward
    skipped = scored = 0
    for token_signals, out in reward.calls:
        for signals, value in zip(token_signals, out):
            if all_nan(signals):
                assert value is None
                skipped += 1
            elif value is not None:
                assert math.isfinite(value)
                scored += 1
    assert skipped == sum(outside) and scored > 0
    assert all(math.isfinite(p.detach().sum().item()) for p in trainer.model.parameters())


def test_token_signal_dicts_and_evaluator_skip_completions_outside_the_tokenizer(tiny_model_dir):
    model, tok = padded_model(tiny_model_dir)
    vocab = len(tok)
    prompts = [p for p in PROMPTS[:2] for _ in range(3)]
    digits = [tok(t, add_special_tokens=False)["input_ids"] for t in ("46", "45", "4x6", "12", "12", "1")]
    completion_ids = [ids + [tok.eos_token_id] for ids in digits]
    completion_ids[1] = completion_ids[1][:1] + [vocab + 3] + completion_ids[1][1:]  # 4 <pad row> 5
    completion_ids[4] = [vocab + EXTRA_ROWS - 1] + completion_ids[4]
    flagged = outside_vocab(completion_ids, vocab)
    assert flagged == [False, True, False, False, True, False]

    ic = InternalConsistency("candidates", layers=[1, 2])
    values = internal_signals(model, tok, prompts, completion_ids, temperature=0.9, batch_size=4, entropy=True,
                              consistency=ic)
    for name, per_completion in values.items():
        for value, bad in zip(per_completion, flagged):
            assert (value is None) == bad, (name, per_completion)
    # the others are what they are without the skipped completions in the batch
    keep = [i for i, bad in enumerate(flagged) if not bad]
    alone = internal_signals(model, tok, [prompts[i] for i in keep], [completion_ids[i] for i in keep],
                             temperature=0.9, batch_size=4, entropy=True)
    for name in ("self_certainty", "negative_entropy"):
        assert [values[name][i] for i in keep] == pytest.approx(alone[name], abs=1e-5)

    # the dicts internal rewards and the verifier read: NaN throughout for the skipped completions
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    dicts = token_signal_dicts(model, tok, prompt_ids, completion_ids, prompts, temperature=0.9,
                               signals=("logps", "entropy", "self_certainty"), lens_modes=("hard", "soft"),
                               lens_layers=[1, 2])
    assert [all_nan(d) for d in dicts] == flagged
    assert all(torch.isfinite(d["self_certainty"]).all() for d, bad in zip(dicts, flagged) if not bad)
    # the self-improvement verifier reads these dicts: a skipped completion has no score, so it is never kept
    texts = tok.batch_decode(completion_ids, skip_special_tokens=True)
    scores = Verifier([SelfCertainty(), InternalConsistency("soft", layers=[1, 2])], [1.0, 1.0]).score(
        prompts, texts, token_signals=dicts)
    assert [s is None for s in scores] == flagged

    # the evaluator end to end: the model samples its padding rows and the report is still written
    data = Dataset.from_dict({"prompt": PROMPTS * 2, "answer": ["46", "12", "100", "7"] * 2})
    ev = EvalConfig(max_rows=8, batch_size=8, max_new_tokens=6, num_samples=4, self_certainty=True,
                    negative_entropy=True, internal_consistency=True, ic_layers=[1, 2])
    report = evaluate_model(model, tok, data, ev)
    for key in ("sampled_accuracy", "sc_correct", "sc_incorrect", "ne_incorrect", "ic_incorrect", "ic_vote_accuracy"):
        assert key in report, key
    assert math.isfinite(report["sc_incorrect"]) and math.isfinite(report["ne_incorrect"])


class StrictChars:
    """One character per token, ids ``0..len-1`` only; decoding another id raises (as slow tokenizers may)."""

    alphabet = "so 0123456789"

    def __len__(self):
        return len(self.alphabet)

    def batch_decode(self, ids, skip_special_tokens=True):
        return [self.alphabet[i[0]] if 0 <= i[0] < len(self) else self.alphabet[len(self) + 99] for i in ids]


def test_padding_row_ids_are_never_answer_positions():
    tok = StrictChars()
    ids = [tok.alphabet.index(c) for c in "so 46"]
    ids = ids[:-1] + [len(tok) + 2] + ids[-1:]  # "so 4<pad row>6"
    indices, found = answer_token_indices(tok, ids)
    assert found and indices == [3, 5]  # the text reads "so 46": the answer's two digits, not the padding row
    indices, found = answer_token_indices(tok, ids[:2] + [len(tok) + 1] * 3, fallback_last_k=4)
    assert not found and indices == [0, 1]
