"""``eval.every_steps``: the held-out evaluation runs during training, its numbers land in the
training log, and it changes nothing about the training itself."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from recipes.common.cli import main


def _history(out) -> list[dict]:
    return json.loads((out / "trainer_state.json").read_text())["log_history"]


def _rlif_config(tmp_path, model_dir) -> str:
    config = tmp_path / "rl.yaml"
    config.write_text(f"""
model: {{name_or_path: "{model_dir}", dtype: float32}}
data: {{path: "tiny://arithmetic?n_train=64&n_test=12"}}
rewards: [{{name: self_certainty, weight: 1.0}}]
eval: {{max_rows: 12, every_rows: 6, before_training: false, max_new_tokens: 4, batch_size: 6, num_samples: 2,
        self_certainty: true, negative_entropy: true}}
trainer:
  max_steps: 3
  per_device_train_batch_size: 8
  num_generations: 4
  max_completion_length: 4
  learning_rate: 1.0e-3
  temperature: 1.0
  logging_steps: 1
  report_to: []
  save_strategy: "no"
  seed: 3
""")
    return str(config)


def test_rlif_evaluates_every_steps_without_changing_training(tmp_path, warm_model_dir):
    """The same seeded run with and without ``eval.every_steps=1``: identical losses and rewards at every
    step (the evaluation samples with its own seed, and the training generators are restored), and
    the evaluation's accuracy and calibration numbers logged at every step."""
    from recipes.rlif import RLIFRecipeConfig, run

    config = _rlif_config(tmp_path, warm_model_dir)
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    main("rlif", RLIFRecipeConfig, run, ["--config", config, f"trainer.output_dir={plain}"])
    main("rlif", RLIFRecipeConfig, run, ["--config", config, f"trainer.output_dir={evaluated}", "eval.every_steps=1"])
    trained = [h for h in _history(plain) if "loss" in h]
    again = [h for h in _history(evaluated) if "loss" in h]
    assert len(trained) == len(again) == 3
    for a, b in zip(trained, again):
        for key in ("loss", "reward", "rewards/self_certainty/mean", "signals/entropy/mean"):
            assert a[key] == b[key], (key, a, b)
    assert not any(k.startswith("eval_") for h in _history(plain) for k in h)
    evals = [h for h in _history(evaluated) if "eval_greedy_accuracy" in h]
    assert [h["step"] for h in evals] == [1, 2, 3]
    for h in evals:  # an entry of its own: TRL's training metrics are not folded into it
        assert "loss" not in h and "reward" not in h
        assert {"eval_sampled_accuracy", "eval_pass@1", "eval_pass@2", "eval_vote_accuracy"} <= set(h)
        assert 0.0 <= h["eval_greedy_accuracy"] <= 1.0
    # calibration AUROC (the warm model answers some of the 6 x 2 samples right, some wrong)
    assert all("eval_sc_auc" in h and "eval_ne_auc" in h for h in evals)
    after = json.loads((evaluated / "eval.json").read_text())["after"]
    assert after["rows"] == 12  # the final evaluation still reads eval.max_rows; during training: every_rows
    from recipes.plot import plot_curves

    drawn = {p.name for p in plot_curves({"run": _history(evaluated)}, tmp_path)}
    assert {"eval_accuracy.png", "eval_calibration.png", "loss.png"} <= drawn


def test_alol_evaluates_every_steps(tmp_path, tiny_model_dir):
    """A-LoL's reward report of the held-out rows, logged every 2 steps as eval_reward, eval_length, ..."""
    from recipes.alol import ALoLRecipeConfig, run
    from tests.test_alol import _alol_overrides, _pairs_file

    out = tmp_path / "out"
    main("alol", ALoLRecipeConfig, run, ["--config", "configs/alol/tiny_arithmetic.yaml", "variants=[]",
         *_alol_overrides(tiny_model_dir, _pairs_file(tmp_path / "pairs.jsonl"), out, tmp_path / "cache"),
         "trainer.variant=nll", "eval.before_training=false", "eval.every_steps=2", "eval.every_rows=3"])
    history = _history(out)
    evals = [h for h in history if "eval_reward" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all({"eval_length", "eval_distinct_1", "eval_distinct_2"} <= set(h) and "loss" not in h for h in evals)
    assert any("loss" in h for h in history)
    card = (out / "README.md").read_text()  # the A-LoL model card: method, citation, rewards, evaluation
    assert "trained with A-LoL, a method introduced in [Leftover-Lunch" in card and "baheti2024improving" in card
    assert "| math_accuracy | 1.0 | - |" in card and "| nll |" in card and "```yaml" in card


def test_sft_evaluates_every_steps(tmp_path, tiny_model_dir):
    """The SFT recipe (TRL's SFTTrainer): the evaluation's entries beside the training ones."""
    from recipes.sft import SFTRecipeConfig, run

    out = tmp_path / "out"
    main("sft", SFTRecipeConfig, run, ["--config", "configs/sft/tiny_arithmetic.yaml", f"model.name_or_path={tiny_model_dir}",
         "data.path=tiny://arithmetic?n_train=64&n_test=8", "trainer.max_steps=2", "trainer.logging_steps=1",
         "trainer.per_device_train_batch_size=8", f"trainer.output_dir={out}", "eval.max_rows=8", "eval.sampled=false",
         "eval.every_steps=1", "eval.before_training=false"])
    history = _history(out)
    assert [h["step"] for h in history if "eval_greedy_accuracy" in h] == [1, 2]
    assert [h["step"] for h in history if "loss" in h] == [1, 2]


def test_preserved_rng_restores_every_generator():
    from recipes.common.periodic_eval import preserved_rng

    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    with preserved_rng():
        torch.manual_seed(99), random.seed(99), np.random.seed(99)
        torch.rand(10), random.random(), np.random.rand()
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_every_steps_and_rows_must_be_positive(tmp_path, value):
    from recipes.common.config import load_config
    from recipes.common.errors import ConfigError
    from recipes.rlif import RLIFRecipeConfig

    for key in ("eval.every_steps", "eval.every_rows"):
        with pytest.raises(ConfigError, match=key):
            load_config(RLIFRecipeConfig, "configs/intuitor/tiny_arithmetic.yaml", [f"{key}={value}"])


def test_every_steps_needs_held_out_data_and_a_recipe_that_honours_it():
    from recipes.common.config import load_config
    from recipes.common.errors import ConfigError
    from recipes.decred import DeCREDRecipeConfig
    from recipes.rlif import RLIFRecipeConfig

    with pytest.raises(ConfigError, match="needs held-out data"):
        load_config(RLIFRecipeConfig, "configs/intuitor/tiny_arithmetic.yaml", ["eval.every_steps=5", "data.eval_split=null"])
    with pytest.raises(ConfigError, match="does not evaluate during training"):
        load_config(DeCREDRecipeConfig, "configs/decred/tiny_decoder_only.yaml", ["eval.every_steps=5"])
    cfg = load_config(RLIFRecipeConfig, "configs/intuitor/tiny_arithmetic.yaml", ["eval.every_steps=5", "eval.every_rows=7"])
    assert (cfg.eval.every_steps, cfg.eval.every_rows) == (5, 7)


@pytest.mark.parametrize("engine", ["ddp", "zero3"])
def test_rlif_evaluates_every_steps_under_two_process_launch(tmp_path, warm_model_dir, engine):
    """``accelerate launch`` on 2 processes (DDP; ZeRO-3 with every parameter partitioned): every rank
    evaluates its share of the rows, each evaluation is one entry of the log (also with completions
    logged), and the evaluation after the last step (its parameters gathered under ZeRO-3) gives the
    numbers the saved model gives after training."""
    from tests.launcher import deepspeed_variant, launch_recipe, untie_embeddings

    launch: str | object = engine
    model_dir = warm_model_dir
    if engine == "zero3":
        launch = deepspeed_variant("zero3", tmp_path / "launch", stage3_param_persistence_threshold=0)
        model_dir = untie_embeddings(warm_model_dir, tmp_path / "untied")
    out = tmp_path / "out"
    result = launch_recipe("rlif", _rlif_config(tmp_path, model_dir), launch, f"trainer.output_dir={out}",
                           "trainer.max_steps=2", "trainer.per_device_train_batch_size=4", "eval.every_steps=1",
                           "eval.every_rows=null", "trainer.log_completions=true")
    evals = [h for h in _history(out) if "eval_greedy_accuracy" in h]
    assert [h["step"] for h in evals] == [1, 2]
    after = json.loads((out / "eval.json").read_text())["after"]
    assert after["processes"] == 2 and after["rows"] == 12
    for key in ("greedy_accuracy", "sampled_accuracy", "sc_auc"):
        assert evals[-1][f"eval_{key}"] == pytest.approx(after[key], abs=1e-6), key
    logged = result.stdout + result.stderr
    assert logged.count("'eval_greedy_accuracy'") == 2, logged[-3000:]  # printed by the main process only
    assert len((out / "completions.jsonl").read_text().splitlines()) == 2 * 8  # 2 steps x 2 ranks x 4
