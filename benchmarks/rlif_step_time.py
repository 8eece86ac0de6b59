"""Step time of RLIFTrainer with an internal reward vs the same trainer with a constant text reward.

Same model, data, config and seed; prints JSON. The baseline (a constant reward, ``log_signals``
off) runs exactly TRL's GRPOTrainer code: no signal pass, no hooks. ``--reward`` picks the
internal reward: ``self_certainty`` (Intuitor; goal: reuse ratio <= 1.05) or
``internal_consistency`` (the logit lens at the answer tokens; goal: ratio <= 1.10; the JSON also
reports the bytes the layer hooks hold: K layers x answer tokens x hidden size). Two cases:
* ``reuse``: ``num_iterations=2``, so TRL itself runs the no-grad old-logps pass and the signals
  ride on it;
* ``extra_pass``: ``num_iterations=1``, TRL runs no such pass and RLIF adds one.

    python benchmarks/rlif_step_time.py [--reward internal_consistency] [--steps 30] [--repeats 3]

Runs alternate (plain, RLIF, plain, RLIF, ...) and each case reports the median over repeats of
the mean step time (the first 2 steps of a run dropped), so machine noise hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.common.data import load_split  # noqa: E402
from recipes.common.modeling import resolve_model_path  # noqa: E402
from recipes.common.schema import DataConfig  # noqa: E402
from rewards import InternalConsistency, Reward, SelfCertainty  # noqa: E402
from trainers import RLIFConfig, RLIFTrainer  # noqa: E402

from common import StepTimer  # noqa: E402  (benchmarks/common.py, beside this script)

REWARDS = {"self_certainty": SelfCertainty, "internal_consistency": InternalConsistency}
GOALS = {"self_certainty": 1.05, "internal_consistency": 1.10}


class MeasuredRLIFTrainer(RLIFTrainer):
    """Records the bytes of layer states the logit-lens hooks hold when rewards read them."""

    lens_bytes: list[int] = []

    def _calculate_rewards(self, *args, **kwargs):
        if self._lens is not None and self._batch.lens_states is not None:
            states = self._batch.lens_states[0]
            self.lens_bytes.append(states.numel() * states.element_size())
        return super()._calculate_rewards(*args, **kwargs)


class ConstantReward(Reward):
    """The cheapest possible text reward: plain GRPO's cost without reward work."""

    def score(self, completion, **row):
        return 1.0


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
    parser.add_argument("--reward", choices=sorted(REWARDS), default="self_certainty")
    args = parser.parse_args()
    model_path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    data = load_split(DataConfig(path="tiny://arithmetic?n_train=4000"), "train").remove_columns(["completion"])
    results = {"model": args.model, "reward": args.reward, "max_completion_length": args.max_completion_length, "steps": args.steps,
               "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case, iters in (("reuse", 2), ("extra_pass", 1)):
            runs = {"constant_reward": [], args.reward: []}
            for _ in range(args.repeats):
                for name, cls, rewards in (("constant_reward", RLIFTrainer, [ConstantReward()]),
                                           (args.reward, MeasuredRLIFTrainer, [REWARDS[args.reward]()])):
                    runs[name].append(run(cls, rewards, model_path, data, tok, args.steps, iters, args.seed, tmp,
                                          args.max_completion_length)["mean_step_s"])
            plain, rlif = (statistics.median(runs[k]) for k in runs)
            results["cases"][case] = {"num_iterations": iters, "step_s": runs, "median_step_s_constant": plain,
                                      f"median_step_s_{args.reward}": rlif, "ratio": rlif / plain}
    goal = GOALS[args.reward]
    results[f"goal_reuse_ratio_le_{goal}"] = results["cases"]["reuse"]["ratio"] <= goal
    if MeasuredRLIFTrainer.lens_bytes:
        results["lens_hook_bytes_max"] = max(MeasuredRLIFTrainer.lens_bytes)
        results["lens_hook_bytes_mean"] = statistics.fmean(MeasuredRLIFTrainer.lens_bytes)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
