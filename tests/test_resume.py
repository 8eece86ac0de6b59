"""A run killed with SIGKILL resumes from its last checkpoint and ends where an unbroken run ends."""

import json
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, run_module


def _config(tmp_path, model_dir):
    path = tmp_path / "resume.yaml"
    path.write_text(f"""
description: resume test
model: {{name_or_path: "{model_dir}", dtype: float32}}
data: {{path: "tiny://arithmetic?n_train=4000", eval_split: null}}
eval: {{before_training: false}}
trainer:
  max_steps: 40
  per_device_train_batch_size: 64
  learning_rate: 1.0e-3
  save_strategy: steps
  save_steps: 10
  logging_steps: 5
  report_to: []
  bf16: false
  gradient_checkpointing: false
  dataloader_num_workers: 0
  seed: 0
""")
    return path


def _losses(run_dir):
    state = json.loads((run_dir / "checkpoint-40" / "trainer_state.json").read_text())
    return {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}


def test_resume_after_sigkill_matches_unbroken_run(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    ref = run_module("recipes.sft", "--config", str(config), f"trainer.output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "recipes.sft", "--config", str(config), f"trainer.output_dir={out}"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint-10" / "trainer_state.json").exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoint-40").exists()  # it really died mid-run
    assert (out / "config.yaml").exists()  # the resolved config sits beside the checkpoints

    resumed = run_module("recipes.sft", "--config", str(config), f"trainer.output_dir={out}",
                         "trainer.resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    ref_losses, resumed_losses = _losses(tmp_path / "ref"), _losses(out)
    assert set(ref_losses) == {5, 10, 15, 20, 25, 30, 35, 40}
    for step in (15, 20, 25, 30, 35, 40):  # steps the resumed run computed itself: same batches, same numbers
        assert abs(ref_losses[step] - resumed_losses[step]) < 1e-4, (step, ref_losses, resumed_losses)
    a = load_file(tmp_path / "ref" / "model.safetensors")
    b = load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
