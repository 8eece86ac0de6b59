"""The RLIF recipe from a config: a user's reward (defined here) trains beside internal ones."""

import json

import pytest

from recipes.common.cli import main
from recipes.rlif import RLIFRecipeConfig, run
from rewards import Reward


class Brevity(Reward):
    """1.0 for completions of at most ``limit`` characters (a user's reward in a user's module)."""

    def __init__(self, limit: int = 3):
        self.limit = limit

    def score(self, completion, **row):
        return float(len(completion) <= self.limit)


def test_user_reward_by_dotted_path_trains_from_a_config(tmp_path, tiny_model_dir, capsys):
    config = tmp_path / "rl.yaml"
    config.write_text(f"""
description: user reward + self-certainty
model: {{name_or_path: "{tiny_model_dir}", dtype: float32}}
data: {{path: "tiny://arithmetic?n_train=64&n_test=8"}}
rewards:
  - {{name: tests.test_recipe_rlif.Brevity, weight: 1.0, kwargs: {{limit: 2}}}}
  - {{name: self_certainty, weight: 0.5}}
eval: {{max_rows: 8, before_training: true, max_new_tokens: 4}}
trainer:
  output_dir: "{tmp_path / 'out'}"
  max_steps: 2
  per_device_train_batch_size: 8
  num_generations: 4
  max_completion_length: 4
  learning_rate: 1.0e-4
  logging_steps: 1
  report_to: []
  save_strategy: "no"
""")
    reports = main("rlif", RLIFRecipeConfig, run, ["--config", str(config)])
    assert set(reports) == {"before", "after"}
    out = tmp_path / "out"
    state = json.loads((out / "eval.json").read_text())
    assert set(state["after"]) >= {"greedy_accuracy", "sampled_accuracy"}
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    logged = capsys.readouterr().out  # the Trainer's per-step log lines
    for key in ("rewards/brevity/mean", "rewards/self_certainty/mean", "rewards/math_accuracy/mean",
                "signals/self_certainty/mean", "signals/entropy/mean", "completions/mean_length"):
        assert f"'{key}'" in logged, key


def test_accuracy_is_logged_at_weight_zero_when_gold_exists(tmp_path):
    from recipes.common.config import load_config
    from recipes.rlif import build_rewards

    config = tmp_path / "c.yaml"
    config.write_text("model: {name_or_path: tiny://qwen2}\ndata: {path: 'tiny://arithmetic'}\n"
                      "rewards: [{name: self_certainty}]\ntrainer: {num_generations: 4, per_device_train_batch_size: 4}\n")
    cfg = load_config(RLIFRecipeConfig, config)
    funcs, weights = build_rewards(cfg, ["prompt", "answer"])
    assert [f.__name__ for f in funcs] == ["self_certainty", "math_accuracy"] and weights == [1.0, 0.0]
    funcs, weights = build_rewards(cfg, ["prompt"])
    assert [f.__name__ for f in funcs] == ["self_certainty"]
    cfg.rewards = []
    with pytest.raises(ValueError, match="at least one reward"):
        build_rewards(cfg, ["prompt"])


def test_bad_reward_kwargs_are_a_config_error_and_empty_override_clears_them(tmp_path):
    from recipes.common.config import load_config
    from recipes.common.errors import ConfigError
    from recipes.rlif import build_rewards

    config = tmp_path / "c.yaml"
    config.write_text("model: {name_or_path: tiny://qwen2}\ndata: {path: 'tiny://arithmetic'}\n"
                      "rewards: [{name: consistency_vote, kwargs: {mode: hard}}]\n"
                      "trainer: {num_generations: 4, per_device_train_batch_size: 4}\n")
    cfg = load_config(RLIFRecipeConfig, config, ["rewards.0.kwargs.mode=sideways"])
    with pytest.raises(ConfigError, match=r"rewards\.0\.kwargs.*consistency_vote: .*mode must be one of"):
        build_rewards(cfg, ["prompt"])
    cfg = load_config(RLIFRecipeConfig, config, ["rewards.0.name=majority_vote", "rewards.0.kwargs={}"])
    assert cfg.rewards[0].kwargs == {}
    assert [f.__name__ for f in build_rewards(cfg, ["prompt"])[0]] == ["majority_vote"]
