"""CLUE: hook-read hidden-state deltas against full ``output_hidden_states``, centroid and score
formulas against explicit numpy, the reward's online rule, and CLUE in RLIF / self-improvement / evaluation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewards import Clue, MathAccuracy
from rewards.clue import clue_score, layer_distance, update_centroids, vote_labels
from trainers.clue import HiddenDelta, reasoning_positions, think_positions
from trainers.signals import pack_prompt_completion, token_signal_dicts

from tests.test_lens import tiny, trl_batch
from tests.test_self_improve import tiny_config  # noqa: F401  (fixture)


@torch.no_grad()
def naive_deltas(model, ids, mask, c, spans, layers):
    """Full ``output_hidden_states`` (entry L final-normed) at the two positions of each row."""
    hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    offset = ids.shape[1] - c - 1
    return torch.stack([torch.stack([hs[layer][r, offset + end] - hs[layer][r, offset + start] for layer in layers])
                        for r, (start, end) in enumerate(spans)])


@pytest.mark.parametrize("family,layers", [("qwen2", None), ("llama", [1, 3]), ("qwen2", [4]), ("llama", [2])])
def test_hooks_equal_output_hidden_states(family, layers):
    model = tiny(family)
    ids, mask, c, _ = trl_batch()
    spans = [(0, 4), (1, 2), (0, 6), (2, 5), (0, 1)]  # lens indices, end <= completion length of the row
    reader = HiddenDelta(model, layers)
    reader.arm(spans, c)
    with torch.no_grad():
        for start in range(0, ids.shape[0], 2):  # micro-batches, as TRL scores
            model(input_ids=ids[start : start + 2], attention_mask=mask[start : start + 2])
    ours = reader.collect()
    want = naive_deltas(model, ids, mask, c, spans, reader.layers)
    assert ours.shape == (5, len(reader.layers), 32)
    # hidden_states[4] is final-normed and tiny()'s norm is not the identity: the last layer is normed once
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_think_positions_with_and_without_tags():
    assert think_positions(list("ab<think>xy</think>z")) == (9, 19)  # 1 + the index of each tag's last token
    assert think_positions(list("xy</think>z")) == (0, 10)    # the prompt opened the block
    assert think_positions(list("<think>xy")) == (7, 9)       # never closed: the last token
    assert think_positions(list("12+3=15")) == (0, 7)


def test_token_signal_dicts_reads_the_delta_in_its_pass(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ["12+34=", "7+5=", "7+5="]
    completions = ["<think>1+3</think>46", "12", ""]
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tok(c, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if c else []) for c in completions]
    out = token_signal_dicts(model, tok, prompt_ids, completion_ids, prompts, temperature=1.0,
                             signals=("hidden_delta", "entropy"), batch_size=2)
    spans = reasoning_positions(tok, completion_ids)
    assert spans[0] == (len("<think>"), len("<think>1+3</think>")) and spans[1] == (0, 3) and spans[2] == (0, 0)
    ids, mask, p = pack_prompt_completion(prompt_ids, completion_ids, tok.pad_token_id)
    layers = list(range(1, model.config.num_hidden_layers + 1))
    want = naive_deltas(model, ids, mask, ids.shape[1] - p, spans, layers)
    for i in (0, 1):
        assert out[i]["hidden_delta_layers"] == layers and "entropy" in out[i]
        torch.testing.assert_close(out[i]["hidden_delta"], want[i], atol=1e-5, rtol=1e-5)
    assert out[2]["hidden_delta"].isnan().all()  # no token: never scored


# ------------------------------------------------------------------------------------------------
# formulas against explicit numpy


def test_distance_and_score_against_numpy():
    rng = np.random.default_rng(0)
    x, s, f = rng.normal(size=(6, 3, 5)), rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    d_s = np.array([np.mean([np.sqrt(np.sum((x[i, k] - s[k]) ** 2)) for k in range(3)]) for i in range(6)])
    d_f = np.array([np.mean([np.sqrt(np.sum((x[i, k] - f[k]) ** 2)) for k in range(3)]) for i in range(6)])
    t = lambda a: torch.tensor(a)
    np.testing.assert_allclose(layer_distance(t(x), t(s)).numpy(), d_s, rtol=1e-12)
    np.testing.assert_allclose(clue_score(t(x), t(s), t(f)).numpy(), d_f - d_s, rtol=1e-12)


@pytest.mark.parametrize("decay", [1.0, 0.7])
def test_online_centroids_equal_weighted_means(decay):
    """After batches b = 1..B, c_class = sum_b decay^(B-b) sum_{i in b, y_i = class} x_i / same weights' sum."""
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(5, 2, 4)), list(rng.choice([0, 1, None], size=5))) for _ in range(4)]
    sums, counts = torch.zeros(2, 2, 4, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for x, y in batches:
        sums, counts = update_centroids(sums, counts, torch.tensor(x), y, decay)
    for cls in (0, 1):
        num = sum(decay ** (3 - b) * x[i] for b, (x, y) in enumerate(batches) for i in range(5) if y[i] == cls)
        den = sum(decay ** (3 - b) for b, (x, y) in enumerate(batches) for i in range(5) if y[i] == cls)
        np.testing.assert_allclose((sums[cls] / counts[cls]).numpy(), num / den, rtol=1e-12)


def test_reward_scores_each_group_with_earlier_batches_and_other_groups_only():
    """Explicit reference: group g of batch b is scored with the plain means of the labelled deltas of
    batches < b and of batch b's other group; never with its own group's."""
    rng = np.random.default_rng(2)
    reward = Clue()
    sig = lambda d: {"hidden_delta": torch.tensor(d, dtype=torch.float32), "hidden_delta_layers": [1, 2]}
    prompts = ["q"] * 4 + ["r"] * 4
    completions = ["5", "5", "6", "no", "1", "2", "2", "2"]   # vote: 1 1 0 0 | 0 1 1 1
    y = np.array([1, 1, 0, 0, 0, 1, 1, 1])
    seen_x, seen_y = [], []
    for step in range(3):
        x = rng.normal(size=(8, 2, 3)).astype(np.float32)
        got = reward(prompts, completions, token_signals=[sig(d) for d in x])
        for g in (range(0, 4), range(4, 8)):
            other = [i for i in range(8) if i not in g]
            X = np.concatenate(seen_x + [x[other]]).astype(np.float64)
            Y = np.concatenate(seen_y + [y[other]])
            s, f = X[Y == 1].mean(0), X[Y == 0].mean(0)
            want = [np.mean(np.linalg.norm(x[i] - f, axis=-1)) - np.mean(np.linalg.norm(x[i] - s, axis=-1)) for i in g]
            np.testing.assert_allclose([got[i] for i in g], want, rtol=1e-6)
        seen_x.append(x)
        seen_y.append(y)
    assert reward.centroids.counts.tolist() == [9.0, 15.0]
    # one group alone, nothing seen before: no centroid outside it, nothing scored
    assert Clue()(["q"] * 3, ["1", "1", "2"], token_signals=[sig(d) for d in x[:3]]) == [None] * 3
    clone = pickle.loads(pickle.dumps(reward))  # rewards are picklable, centroids included
    restored = Clue()
    restored.load_state_dict(clone.state_dict())
    probe = torch.tensor(rng.normal(size=(2, 2, 3)), dtype=torch.float32)
    assert reward.centroids.score(probe).tolist() == restored.centroids.score(probe).tolist()


def test_labels_vote_gold_binary_and_bad_arguments():
    assert vote_labels(["a", "a", "a", "b", "b"], ["3", "3", "4", "x", "y"]) == [1, 1, 0, None, None]
    gold = Clue(labels="gold", binary=True)
    assert gold.labels_of(["a", "a"], ["3", "4"], answer=["4", "4"]) == [0, 1]
    with pytest.raises(ValueError, match="answer"):
        gold.labels_of(["a"], ["3"])
    sig = lambda v: {"hidden_delta": torch.tensor([[v, 0.0]]), "hidden_delta_layers": [1]}
    gold(["a", "a"], ["3", "4"], token_signals=[sig(1.0), sig(-1.0)], answer=["3", "3"])
    assert gold(["b"], ["9"], token_signals=[sig(0.8)], answer=["1"]) == [1.0]   # nearer success: 1[score > 0]
    for kwargs in ({"labels": "oracle"}, {"decay": 0.0}, {"min_count": 0}, {"layers": []}):
        with pytest.raises(ValueError):
            Clue(**kwargs)
    with pytest.raises(ValueError, match="not read"):
        Clue(layers=[3])(["a"], ["1"], token_signals=[sig(1.0)])


# ------------------------------------------------------------------------------------------------
# CLUE in RLIF, self-improvement and evaluation


class ClueProbe(Clue):
    """Records the signals and completion ids it is given."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def __call__(self, prompts, completions, token_signals=None, completion_ids=None, **kw):
        self.seen.append((token_signals, completion_ids, list(prompts)))
        return super().__call__(prompts, completions, token_signals=token_signals, **kw)


def test_rlif_reads_the_delta_in_its_pass_and_trains(tiny_model_dir, tmp_path):
    from tests.test_rlif import PROMPTS, make_trainer

    probe = ClueProbe()
    trainer = make_trainer(tiny_model_dir, tmp_path, [probe, MathAccuracy()], reward_weights=[1.0, 0.0],
                           log_signals=False, max_completion_length=8, max_steps=3)
    assert trainer._delta is not None and trainer.signal_names == ()
    inputs = [{"prompt": p, "answer": "0"} for p in PROMPTS[:2] for _ in range(4)]
    torch.manual_seed(0)
    trainer.model.train()
    trainer._generate_and_score_completions(inputs)
    signals, completion_ids, prompts = probe.seen[-1]
    tok = trainer._tokenizer
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    ids, mask, p = pack_prompt_completion(prompt_ids, completion_ids, tok.pad_token_id)
    layers = list(range(1, trainer.model.config.num_hidden_layers + 1))
    want = naive_deltas(trainer.model.eval(), ids, mask, ids.shape[1] - p, reasoning_positions(tok, completion_ids),
                        layers)
    torch.testing.assert_close(torch.stack([s["hidden_delta"] for s in signals]), want, atol=1e-5, rtol=1e-5)
    assert probe.centroids.counts.sum() > 0  # the batch joined the centroids
    trainer.model.train()
    before = [q.detach().clone() for q in trainer.model.parameters()]
    trainer.train()
    key = f"rewards/{probe.name}/mean"
    scored = [h[key] for h in trainer.state.log_history if key in h]
    assert scored and any(np.isfinite(scored))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_self_improvement_round_with_the_clue_verifier(tiny_config, tmp_path):
    """One round: the verifier reads deltas in the sampling pass, scores every group against the
    round's other groups, keeps the best-scored sample of each prompt and saves its centroids."""
    import json

    from datasets import load_from_disk

    from tests.test_self_improve import _run

    out = tmp_path / "run"
    report = _run(tiny_config, out, "improve.iterations=1", "eval.before_training=false",
                  "rewards=[{name: clue, weight: 1.0}]", "improve.selection=top_k", "improve.ds_valid_rows=0")
    data = load_from_disk(str(out / "round_1" / "samples"))
    scores = np.array(data["score"])
    assert np.isfinite(scores).mean() > 0.5 and report["round_1"]["kept"] >= 1
    state = torch.load(out / "round_1" / "verifier_state.pt", weights_only=False)
    labels = vote_labels(list(data["group"]), list(data["completion"]))
    assert state[0]["counts"].tolist() == [labels.count(0), labels.count(1)]
    assert json.loads((out / "round_1" / "DONE").read_text())["kept"] == report["round_1"]["kept"]


def test_evaluation_column_is_cross_fit_on_the_other_half_of_the_prompts():
    """Each sample is scored with centroids of the other half's samples (gold labels), never its own half's."""
    from recipes.common.evaluation import clue_column

    rng = np.random.default_rng(3)
    n, prompts = 3, 5                                  # halves: prompts 0-2 (rows 0-8), prompts 3-4 (rows 9-14)
    x = rng.normal(size=(n * prompts, 2, 5))
    correct = [bool(v) for v in rng.integers(0, 2, size=n * prompts)]
    correct[:2], correct[9:11] = [True, False], [True, False]
    deltas = [torch.tensor(d) for d in x]
    deltas[5] = torch.full((2, 5), float("nan"))  # not scorable: no score, not in any centroid
    got = clue_column(deltas, correct, n)
    assert got[5] is None
    y = np.array(correct)
    for half in (range(0, 9), range(9, 15)):
        other = np.array([i for i in range(n * prompts) if i not in half and i != 5])
        s, f = x[other][y[other]].mean(0), x[other][~y[other]].mean(0)
        for i in half:
            if i != 5:
                want = np.mean(np.linalg.norm(x[i] - f, axis=-1)) - np.mean(np.linalg.norm(x[i] - s, axis=-1))
                assert got[i] == pytest.approx(want, rel=1e-9)
    assert clue_column(deltas[:3], correct[:3], n) == [None] * 3   # one prompt: no other half


def test_rlif_checkpoint_saves_and_restores_the_centroids(tiny_model_dir, tmp_path):
    from tests.test_rlif import make_trainer

    trainer = make_trainer(tiny_model_dir, tmp_path, [Clue()], log_signals=False, max_steps=2, save_strategy="steps",
                           save_steps=2)
    trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "reward_state_0.pt", weights_only=False)
    live = trainer.reward_funcs[0].state_dict()
    assert live["counts"].sum() > 0 and torch.equal(saved[0]["sums"], live["sums"])
    fresh = make_trainer(tiny_model_dir, tmp_path / "again", [Clue()], log_signals=False)
    fresh._load_rng_state(str(checkpoint))  # what Trainer.train(resume_from_checkpoint=...) calls
    restored = fresh.reward_funcs[0].state_dict()
    assert torch.equal(restored["sums"], live["sums"]) and torch.equal(restored["counts"], live["counts"])


def test_config_refuses_bad_clue_settings_before_any_model_loads():
    from recipes.common.config import load_config
    from recipes.common.errors import ConfigError
    from recipes.rlif import RLIFRecipeConfig, build_rewards

    from tests.conftest import ROOT

    path = ROOT / "configs/rlif/tiny_arithmetic_clue.yaml"
    with pytest.raises(ConfigError, match=r"layers \[9\] outside"):
        load_config(RLIFRecipeConfig, path, ["rewards.0.kwargs.layers=[9]"])
    with pytest.raises(ConfigError, match="eval.clue"):
        load_config(RLIFRecipeConfig, path, ["eval.clue=maybe"])
    cfg = load_config(RLIFRecipeConfig, path, ["rewards.0.kwargs.labels=oracle"])
    with pytest.raises(ConfigError, match="labels must be 'vote' or 'gold'"):
        build_rewards(cfg, ["prompt", "answer"])
