"""TTRL's vote_samples: N completions per prompt vote, the first M train (trainers/vote.py)."""

import pytest
import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOTrainer

from rewards import MajorityVote, MathAccuracy, SelfCertainty
from trainers import RLIFConfig, RLIFTrainer
from trainers.vote import select_trained, ttrl_metrics

PROMPTS = ["12+34=", "7+5=", "99+1=", "3+4="]


class RecordingVote(MajorityVote):
    """majority_vote that records the prompts and completions of every call."""

    name = "recording_vote"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **columns):
        self.calls.append((list(prompts), list(completions)))
        return super().__call__(prompts, completions, **columns)


class LossProbe(RLIFTrainer):
    """Records the rows each loss computation sees."""

    def _compute_loss(self, model, inputs):
        self.loss_rows = getattr(self, "loss_rows", [])
        self.loss_rows.append((inputs["completion_ids"].shape[0], inputs["advantages"].detach().clone()))
        return super()._compute_loss(model, inputs)


def make_trainer(model_dir, tmp_path, rewards, cls=RLIFTrainer, **overrides):
    options = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                   vote_samples=8, max_completion_length=6, temperature=1.0, learning_rate=1e-3, bf16=False,
                   use_cpu=True, gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no",
                   seed=0, max_steps=2)
    options.update(overrides)
    data = Dataset.from_dict({"prompt": PROMPTS * 8, "answer": ["46", "12", "100", "7"] * 8})
    return cls(model=model_dir, reward_funcs=rewards, args=RLIFConfig(**options), train_dataset=data,
               processing_class=AutoTokenizer.from_pretrained(model_dir))


def test_select_trained_and_metrics_against_naive():
    torch.manual_seed(0)
    n, m, groups = 6, 4, 5
    table = torch.rand(groups * n, 3)
    expected = torch.cat([table[g * n : g * n + m] for g in range(groups)])
    assert torch.equal(select_trained(table, n, m), expected)

    vote = (torch.rand(groups, n) > 0.5).float()
    gold = (torch.rand(groups, n) > 0.5).float()
    vote[1] = 0  # a group where nothing parsed: no label, counted as a wrong label
    got = ttrl_metrics(vote, gold)
    label = [bool(vote[g].any()) and bool(gold[g][vote[g].bool()][0] == 1) for g in range(groups)]
    assert got["ttrl/majority_ratio"] == pytest.approx(vote.sum().item() / (groups * n))
    assert got["ttrl/label_accuracy"] == pytest.approx(sum(label) / groups)
    assert got["ttrl/reward_accuracy"] == pytest.approx((vote == gold).float().mean().item())
    assert set(ttrl_metrics(vote, None)) == {"ttrl/majority_ratio"}


def test_config_checks():
    base = dict(output_dir="/tmp/x", per_device_train_batch_size=8, num_generations=4, use_cpu=True, bf16=False,
                report_to=[])
    with pytest.raises(ValueError, match="must be >= num_generations"):
        RLIFConfig(**base, vote_samples=2)
    assert RLIFConfig(**base, vote_samples=64).vote_samples == 64


def test_internal_reward_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="internal rewards"):
        make_trainer(tiny_model_dir, tmp_path, [SelfCertainty(), MajorityVote()])


def test_label_is_voted_over_all_samples(tiny_model_dir, tmp_path, monkeypatch):
    """Trained completions say 1, 1, 1, 2; the four vote-only ones say 2: the label is 2 (5 of 8 votes),
    so the trained rewards are 0, 0, 0, 1 (voting over the trained four alone would give 1, 1, 1, 0)."""
    vote = RecordingVote()
    trainer = make_trainer(tiny_model_dir, tmp_path, [vote, MathAccuracy()])
    trainer.model.train()
    tok = trainer._tokenizer
    seen = []

    def scripted(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen.append((len(prompt_ids), num_generations))
        texts = ["1" if i % num_generations < 3 else "2" for i in range(len(prompt_ids))]
        return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts], None

    monkeypatch.setattr(GRPOTrainer, "_generate_single_turn", scripted)
    prompts = [p for p in PROMPTS[:2] for _ in range(4)]  # two local groups of M = 4
    inputs = [{"prompt": p, "answer": "2"} for p in prompts]
    _, completion_ids, _, completions = trainer._generate(prompts)[:4]
    assert seen == [(16, 8)]  # one backend call: N = 8 completions of each of the 2 prompts
    assert len(completion_ids) == 8 and completions == ["1", "1", "1", "2"] * 2
    rewards = trainer._calculate_rewards(inputs, prompts, completions, completion_ids)
    assert rewards[:, 0].tolist() == [0.0, 0.0, 0.0, 1.0] * 2
    assert rewards[:, 1].tolist() == [0.0, 0.0, 0.0, 1.0] * 2  # gold 2: the trained rows' own accuracy
    (call_prompts, call_completions), = vote.calls
    assert len(call_completions) == 16 and call_prompts == [p for p in PROMPTS[:2] for _ in range(8)]
    assert trainer._metrics["train"]["ttrl/majority_ratio"] == [pytest.approx(5 / 8)]
    assert trainer._metrics["train"]["ttrl/label_accuracy"] == [1.0]
    assert trainer._metrics["train"]["ttrl/reward_accuracy"] == [1.0]


def test_train_votes_over_n_and_trains_on_m(tiny_model_dir, tmp_path):
    vote = RecordingVote()
    trainer = make_trainer(tiny_model_dir, tmp_path, [vote, MathAccuracy()], cls=LossProbe)
    trainer.train()
    assert len(vote.calls) == 2  # one generation batch per step
    for prompts, completions in vote.calls:
        assert len(completions) == 16  # 2 prompts x N = 8
        assert prompts[:8] == [prompts[0]] * 8 and prompts[8:] == [prompts[8]] * 8
    assert [rows for rows, _ in trainer.loss_rows] == [8, 8]  # 2 prompts x M = 4 in the loss
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"ttrl/majority_ratio", "ttrl/label_accuracy", "ttrl/reward_accuracy",
            "rewards/recording_vote/mean"} <= logged
    for entry in trainer.state.log_history:
        if "ttrl/majority_ratio" in entry:
            assert 0.0 <= entry["ttrl/label_accuracy"] <= 1.0
            # mean over the step's 2 groups of (winning cluster / 8), a group without a parseable answer 0
            assert entry["ttrl/majority_ratio"] in (0.0, 1 / 16) or 1 / 8 <= entry["ttrl/majority_ratio"] <= 1.0
