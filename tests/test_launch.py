"""Recipes run under `accelerate launch` with two processes (gloo on CPU) as one data-parallel job."""

import json

from tests.conftest import ROOT, run_module


def launch_two(recipe: str, config: str, port: int, *overrides: str):
    """``accelerate launch`` the recipe on 2 processes with the repo's DDP config."""
    result = run_module(
        "accelerate.commands.launch", "--config_file", str(ROOT / "launch/accelerate/ddp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(port),
        "-m", f"recipes.{recipe}", "--config", str(ROOT / config), *overrides, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def test_sft_under_two_process_accelerate_launch(tmp_path, tiny_model_dir):
    out = tmp_path / "ddp"
    launch_two("sft", "configs/sft/tiny_arithmetic.yaml", 29517, f"model.name_or_path={tiny_model_dir}",
               "trainer.max_steps=4", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=8",
               f"trainer.output_dir={out}", "eval.max_rows=8", "eval.before_training=false",
               "trainer.save_strategy=steps", "trainer.save_steps=4")
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # one job over two ranks: 4 steps x 8 rows x 2 processes of the 20,000 training rows
    assert abs(state["epoch"] - 4 * 8 * 2 / 20000) < 1e-6, state["epoch"]
    assert (out / "model.safetensors").exists() and (out / "config.yaml").exists()
    assert (out / "eval.json").exists()


def test_rlif_under_two_process_accelerate_launch(tmp_path, tiny_model_dir):
    """Signals are computed on each rank for its own completions; TRL gathers the rewards."""
    out = tmp_path / "ddp_rlif"
    launch_two("intuitor", "configs/intuitor/tiny_arithmetic.yaml", 29518, f"model.name_or_path={tiny_model_dir}",
               "trainer.max_steps=2", "trainer.logging_steps=1", "trainer.per_device_train_batch_size=8",
               "trainer.num_generations=4", f"trainer.output_dir={out}", "eval.max_rows=8",
               "trainer.save_strategy=steps", "trainer.save_steps=2")
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    logs = [h for h in state["log_history"] if "rewards/self_certainty/mean" in h]
    assert len(logs) == 2
    assert all(h["num_tokens"] > 0 and "signals/self_certainty/mean" in h for h in logs)
    assert (out / "eval.json").exists()
