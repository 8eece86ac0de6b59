"""A run killed with SIGKILL resumes from its last checkpoint and ends where an unbroken run ends."""

import json
import math
import os
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


# -- RL recipes: RLIF (online: generation, internal + gold rewards) and A-LoL (offline, advantage sampling) --

TIMING = ("time", "runtime", "per_second", "flos")


def _kill_at_checkpoint(recipe: str, config, out, step: int, env: dict) -> None:
    """Start ``recipe``, SIGKILL it as soon as ``checkpoint-<step>`` is complete (it is then mid-run)."""
    proc = subprocess.Popen([sys.executable, "-m", f"recipes.{recipe}", "--config", str(config),
                             f"trainer.output_dir={out}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / f"checkpoint-{step}" / "trainer_state.json").exists():
        assert proc.poll() is None, "run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _step_logs(checkpoint) -> dict[int, dict]:
    """Per-step training logs (timings left out) of a run's last checkpoint."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return {h["step"]: {k: v for k, v in h.items() if not any(t in k for t in TIMING)}
            for h in state["log_history"] if "loss" in h}


def _same_metrics(ref: dict, resumed: dict, steps) -> None:
    for step in steps:
        assert ref[step].keys() == resumed[step].keys(), step
        for key, value in ref[step].items():
            other = resumed[step][key]
            if isinstance(value, float) and not (math.isnan(value) and math.isnan(other)):
                assert abs(value - other) <= 1e-4 * max(1.0, abs(value)), (step, key, value, other)
            else:
                assert value == other, (step, key, value, other)


def _killed_and_resumed(recipe: str, config, tmp_path, checkpoint: int, final: int, monkeypatch, env_for=None):
    """Reference run, a run SIGKILLed after ``checkpoint-<checkpoint>``, its resumption; their directories.
    ``env_for(run name)``: extra environment of each run ("ref", "killed", "resumed")."""
    def environment(name):
        for key, value in (env_for(name) if env_for else {}).items():
            monkeypatch.setenv(key, value)
        return {**os.environ, "PYTHONPATH": str(ROOT)}

    environment("ref")
    ref = run_module(f"recipes.{recipe}", "--config", str(config), f"trainer.output_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "killed"
    _kill_at_checkpoint(recipe, config, out, checkpoint, environment("killed"))
    assert not (out / f"checkpoint-{final}").exists()  # it really died mid-run
    environment("resumed")
    resumed = run_module(f"recipes.{recipe}", "--config", str(config), f"trainer.output_dir={out}",
                         "trainer.resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return tmp_path / "ref", out


def _same_weights(a_dir, b_dir) -> None:
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rlif_resume_after_sigkill_matches_unbroken_run(tmp_path, tiny_model_dir, monkeypatch):
    """Self-certainty + gold accuracy, 12 steps, checkpoints every 4: after resuming from step 4 the
    run draws the same prompts, samples the same completions and logs the same numbers."""
    config = tmp_path / "rlif.yaml"
    config.write_text(f"""
base: [{ROOT / 'configs/rlif/tiny_arithmetic_gold.yaml'}]
description: resume test (RLIF)
model: {{name_or_path: "{tiny_model_dir}"}}
data: {{path: "tiny://arithmetic?n_train=400", eval_split: null}}
rewards:
  - {{name: self_certainty, weight: 1.0}}
  - {{name: math_accuracy, weight: 0.5}}
  - {{name: tests.signal_probe.RecordSignals, weight: 0.0,
      kwargs: {{directory: "${{oc.env:RESUME_PROBE}}", signals: [self_certainty]}}}}
trainer:
  max_steps: 12
  per_device_train_batch_size: 16
  num_generations: 4
  learning_rate: 1.0e-3
  save_strategy: steps
  save_steps: 4
  logging_steps: 1
""")
    ref, out = _killed_and_resumed("rlif", config, tmp_path, 4, 12, monkeypatch,
                                   env_for=lambda name: {"RESUME_PROBE": str(tmp_path / f"probe-{name}")})
    ref_logs, resumed_logs = _step_logs(ref / "checkpoint-12"), _step_logs(out / "checkpoint-12")
    assert set(ref_logs) == set(range(1, 13))
    assert resumed_logs.keys() == ref_logs.keys()
    _same_metrics(ref_logs, resumed_logs, range(5, 13))  # the steps the resumed run computed itself
    assert len({ref_logs[s]["rewards/self_certainty/mean"] for s in range(5, 13)}) > 1  # the numbers do vary
    # data order and sampling: call k of the resumed run is step 5 + k, i.e. call 4 + k of the reference
    for k in range(8):
        got = torch.load(tmp_path / "probe-resumed" / f"rank0_call{k}.pt", weights_only=False)
        want = torch.load(tmp_path / "probe-ref" / f"rank0_call{k + 4}.pt", weights_only=False)
        assert got["prompts"] == want["prompts"], k
        assert got["completion_ids"] == want["completion_ids"], k
    _same_weights(ref, out)


def test_alol_resume_after_sigkill_matches_unbroken_run(tmp_path, tiny_model_dir, monkeypatch):
    """A-LoL (priority sampling by advantage, about 11 steps per epoch of its sampler): resuming from
    step 6 (mid epoch, the next epoch's draw still ahead) draws the same rows and logs the same numbers
    as the unbroken run."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(240):
        a, b = rng.randrange(10, 100), rng.randrange(10, 100)
        answer = a + b if rng.random() < 0.5 else a + b + rng.choice([-10, -1, 1, 10])
        rows.append({"question": f"{a}+{b}=", "answer": str(a + b), "completion": str(answer)})
    data = tmp_path / "alol.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "alol.yaml"
    config.write_text(f"""
description: resume test (A-LoL)
model: {{name_or_path: "{tiny_model_dir}", dtype: float32}}
data: {{path: "{data}", split: train, eval_split: null}}
rewards:
  - {{name: math_accuracy, weight: 1.0}}
value_split: null
eval: {{before_training: false}}
trainer:
  variant: a_lol
  max_steps: 18
  scale_steps_by_kept_fraction: false
  per_device_train_batch_size: 12
  max_length: 32
  learning_rate: 1.0e-3
  save_strategy: steps
  save_steps: 6
  logging_steps: 1
  alol_cache_dir: "{tmp_path / 'cache'}"
  report_to: []
  bf16: false
  gradient_checkpointing: false
  dataloader_num_workers: 0
  seed: 0
""")
    ref, out = _killed_and_resumed("alol", config, tmp_path, 6, 18, monkeypatch)
    ref_logs, resumed_logs = _step_logs(ref / "checkpoint-18"), _step_logs(out / "checkpoint-18")
    assert set(ref_logs) == set(range(1, 19))
    assert ref_logs[1]["alol/kept_fraction"] < 0.9  # advantage sampling is on: some rows are never drawn
    assert ref_logs[18]["epoch"] > 1  # the sampler's second epoch (a new draw) is part of the resumed run
    _same_metrics(ref_logs, resumed_logs, range(7, 19))
    assert len({ref_logs[s]["loss"] for s in range(7, 19)}) > 1
    _same_weights(ref, out)
