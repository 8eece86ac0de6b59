"""Step time of RLIFTrainer with self_certainty vs plain TRL GRPOTrainer with a constant reward.

Same model, data, config and seed; prints JSON. Two cases:
* ``reuse``: ``num_iterations=2``, so TRL itself runs the no-grad old-logps pass and the signals
  ride on it (goal: ratio <= 1.05);
* ``extra_pass``: ``num_iterations=1``, TRL runs no such pass and RLIF adds one.

    python benchmarks/rlif_step_time.py [--steps 30] [--repeats 3] [--model tiny://qwen2?layers=4&hidden=256]

Runs alternate (plain, RLIF, plain, RLIF, ...) and each case reports the median over repeats of
the mean step time (the first 2 steps of a run dropped), so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.config import DataConfig  # noqa: E402
from recipes.data import load_split  # noqa: E402
from recipes.modeling import resolve_model_path  # noqa: E402
from rewards import Reward, SelfCertainty  # noqa: E402
from trainers import RLIFConfig, RLIFTrainer  # noqa: E402


class ConstantReward(Reward):
    """The cheapest possible text reward: plain GRPO's cost without reward work."""

    def score(self, completion, **row):
        return 1.0


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._t)


def run(trainer_cls, rewards, model_path, data, tok, steps, num_iterations, seed, out_dir, max_completion_length):
    args = RLIFConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=32, num_generations=8,
                      max_completion_length=max_completion_length, temperature=0.9, learning_rate=1e-6, num_iterations=num_iterations,
                      bf16=False, use_cpu=True, gradient_checkpointing=False, report_to=[], save_strategy="no",
                      logging_steps=steps, seed=seed, log_signals=False)
    timer = StepTimer()
    torch.manual_seed(seed)
    trainer = trainer_cls(model=model_path, reward_funcs=rewards, args=args, train_dataset=data, processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    times = timer.times[2:]  # drop warm-up steps; with num_iterations=2 a generation is every other step
    return {"mean_step_s": statistics.fmean(times), "median_step_s": statistics.median(times), "steps": len(times)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tiny://qwen2?layers=4&hidden=256&intermediate=1024")
    parser.add_argument("--max-completion-length", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    data = load_split(DataConfig(path="tiny://arithmetic?n_train=4000"), "train").remove_columns(["completion"])
    results = {"model": args.model, "max_completion_length": args.max_completion_length, "steps": args.steps,
               "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case, iters in (("reuse", 2), ("extra_pass", 1)):
            runs = {"grpo_constant_reward": [], "rlif_self_certainty": []}
            for _ in range(args.repeats):
                for name, cls, rewards in (("grpo_constant_reward", GRPOTrainer, [ConstantReward()]),
                                           ("rlif_self_certainty", RLIFTrainer, [SelfCertainty()])):
                    runs[name].append(run(cls, rewards, model_path, data, tok, args.steps, iters, args.seed, tmp,
                                          args.max_completion_length)["mean_step_s"])
            plain, rlif = (statistics.median(runs[k]) for k in runs)
            results["cases"][case] = {"num_iterations": iters, "step_s": runs, "median_step_s_grpo": plain,
                                      "median_step_s_rlif": rlif, "ratio": rlif / plain}
    results["goal_reuse_ratio_le_1.05"] = results["cases"]["reuse"]["ratio"] <= 1.05
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
