"""RLIFTrainer as a drop-in for GRPOTrainer: a plain GRPOConfig, args=None, state before __init__'s body."""

import math

import torch
from datasets import Dataset
from transformers import AutoTokenizer
from trl import GRPOConfig, GRPOTrainer
from trl.trainer import grpo_trainer

from rewards import InternalConsistency, MathAccuracy, SelfCertainty
from trainers import RLIFTrainer
from trainers.rlif import RLIF_DEFAULTS

PROMPTS = ["12+34=", "7+5=", "99+1=", "3+4="]
SMALL = dict(per_device_train_batch_size=8, num_generations=4, max_completion_length=6, learning_rate=1e-3,
             bf16=False, use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0, max_steps=2)


def data():
    return Dataset.from_dict({"prompt": PROMPTS * 4, "answer": ["46", "12", "100", "7"] * 4})


def check_trained(trainer, reward_name):
    logs = [h for h in trainer.state.log_history if f"rewards/{reward_name}/mean" in h]
    assert len(logs) == 2
    assert all(math.isfinite(h[f"rewards/{reward_name}/mean"]) for h in logs)
    assert all(math.isfinite(h["signals/self_certainty/mean"]) for h in logs)  # log_signals: its RLIFConfig default


def test_plain_grpo_config_trains_with_internal_rewards(tiny_model_dir, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path / "out"), **SMALL)
    rewards = [SelfCertainty(), InternalConsistency(mode="candidates", layers=[1, 2])]
    trainer = RLIFTrainer(model=tiny_model_dir, reward_funcs=rewards, args=args, train_dataset=data(),
                          processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert type(trainer.args) is GRPOConfig
    trainer.train()  # on main: 'GRPOConfig' object has no attribute 'signal_chunk_size'
    check_trained(trainer, "self_certainty")
    check_trained(trainer, "internal_consistency")
    assert trainer._option("ic_quantile") == RLIF_DEFAULTS["ic_quantile"] == 0.5


def test_args_none_builds_a_grpo_config_and_trains(tiny_model_dir, tmp_path, monkeypatch):
    """``args=None``: TRL builds ``GRPOConfig(f"{model}-GRPO")``. Its defaults ask for bf16 (refused on a CPU
    machine) and 256-token completions, so the class TRL calls is wrapped to add CPU-sized options; what
    reaches the trainer is still a plain ``GRPOConfig`` built by TRL's own ``args is None`` branch."""
    built = []

    def cpu_grpo_config(output_dir):
        built.append(GRPOConfig(output_dir, **SMALL))
        return built[-1]

    monkeypatch.setattr(grpo_trainer, "GRPOConfig", cpu_grpo_config)
    monkeypatch.chdir(tmp_path)
    trainer = RLIFTrainer(model=tiny_model_dir, reward_funcs=[SelfCertainty(), MathAccuracy()], args=None,
                          train_dataset=data(), processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    assert built and trainer.args is built[0] and type(trainer.args) is GRPOConfig
    trainer.train()
    check_trained(trainer, "self_certainty")


def test_overrides_work_on_state_set_by_grpo_trainer_alone(tiny_model_dir, tmp_path):
    """Per-batch state has class-level defaults: RLIFTrainer's overrides run on an object whose only
    state is what ``GRPOTrainer.__init__`` set (as a subclass that skips our ``__init__`` body, or a
    test double, would build), and then behave as GRPOTrainer's."""
    args = GRPOConfig(output_dir=str(tmp_path / "out"), **SMALL)
    grpo = GRPOTrainer(model=tiny_model_dir, reward_funcs=[MathAccuracy()], args=args, train_dataset=data(),
                       processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer = RLIFTrainer.__new__(RLIFTrainer)
    trainer.__dict__.update(grpo.__dict__)
    inputs = [{"prompt": p, "answer": "46"} for p in PROMPTS[:2] for _ in range(4)]
    torch.manual_seed(0)
    ours = trainer._generate_and_score_completions(inputs)
    torch.manual_seed(0)
    theirs = grpo._generate_and_score_completions(inputs)
    torch.testing.assert_close(ours["completion_ids"], theirs["completion_ids"])
    torch.testing.assert_close(ours["advantages"], theirs["advantages"])
