"""Training step time of ALoLTrainer vs plain TRL SFTTrainer on the same model, data and config.

The A-LoL precompute (rewards, value head, reference pass) happens once before training and is
timed separately (trainer construction with an empty cache, minus SFTTrainer's construction).
Steps are timed by a callback (first 2 dropped); runs alternate (SFT, A-LoL, SFT, ...) and each
side reports the median over repeats of its mean step time. Goal: ratio <= 1.15. Prints JSON.

    python benchmarks/alol_step_time.py [--steps 30] [--repeats 3] [--variant a_lol_seq]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from recipes.common.modeling import resolve_model_path  # noqa: E402
from recipes.common.tiny.tasks import ArithmeticSpec, arithmetic_rows  # noqa: E402
from rewards import MathAccuracy  # noqa: E402
from trainers import ALoLConfig, ALoLTrainer  # noqa: E402

from common import StepTimer  # noqa: E402  (benchmarks/common.py, beside this script)

WORDS = ["so", "the", "sum", "is", "because", "we", "add", "carry", "digits", "then"]


def rows(n: int, words: int, seed: int = 0) -> list[dict]:
    """Prompt/response pairs: half right, half wrong answers, each after ~``words`` filler words."""
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(arithmetic_rows(ArithmeticSpec(n_train=n, seed=seed), "train")):
        answer = r["answer"] if i % 2 == 0 else str(int(r["answer"]) + 1)
        filler = " ".join(rng.choice(WORDS) for _ in range(rng.randint(words // 2, words)))
        out.append({"prompt": r["question"], "completion": f"{filler} {answer}", "answer": r["answer"]})
    return out


def common(out_dir: str, steps: int, seed: int) -> dict:
    return dict(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=16, learning_rate=1e-5,
                lr_scheduler_type="constant", bf16=False, use_cpu=True, report_to=[], save_strategy="no",
                logging_steps=steps, seed=seed, max_length=256, dataloader_num_workers=0, disable_tqdm=True)


def run_sft(model_path, tok, data, steps, seed, out_dir):
    timer = StepTimer()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=SFTConfig(**common(out_dir, steps, seed)),
                         train_dataset=data.select_columns(["prompt", "completion"]), processing_class=tok, callbacks=[timer])
    init = time.perf_counter() - t0
    trainer.train()
    return statistics.fmean(timer.times[2:]), init


def run_alol(model_path, tok, data, value, steps, seed, out_dir, variant, cache):
    timer = StepTimer()
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    args = ALoLConfig(**common(out_dir, steps, seed), variant=variant, scale_steps_by_kept_fraction=False,
                      alol_cache_dir=cache, value_epochs=3, value_learning_rate=1e-3, value_max_new_tokens=16,
                      precompute_batch_size=64)
    trainer = ALoLTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=args, train_dataset=data,
                          processing_class=tok, reward_funcs=[MathAccuracy()], value_dataset=value, callbacks=[timer])
    init = time.perf_counter() - t0
    trainer.train()
    return statistics.fmean(timer.times[2:]), init, trainer.alol.loaded_from_cache


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--words", type=int, default=24, help="filler words per response (response length)")
    parser.add_argument("--variant", default="a_lol")
    parser.add_argument("--model", default="tiny://qwen2?layers=4&hidden=256&intermediate=1024")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_path = resolve_model_path(args.model)
    tok = AutoTokenizer.from_pretrained(model_path)
    data = Dataset.from_list(rows(args.rows, args.words, args.seed))
    value = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows(200, 1, args.seed + 1)])
    results = {"model": args.model, "variant": args.variant, "rows": args.rows, "steps": args.steps,
               "repeats": args.repeats, "batch_size": 16, "torch_threads": torch.get_num_threads()}
    sft, alol, precompute, cached_init, sft_init = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            step, init = run_sft(model_path, tok, data, args.steps, args.seed, f"{tmp}/sft")
            sft.append(step)
            sft_init.append(init)
            step, init, cached = run_alol(model_path, tok, data, value, args.steps, args.seed, f"{tmp}/alol",
                                          args.variant, f"{tmp}/cache")
            alol.append(step)
            (cached_init if cached else precompute).append(init)
    base_init = statistics.median(sft_init)
    results.update({
        "step_s": {"sft": sft, "alol": alol},
        "median_step_s_sft": statistics.median(sft), "median_step_s_alol": statistics.median(alol),
        "ratio": statistics.median(alol) / statistics.median(sft),
        "init_s_sft": base_init,
        "precompute_s": precompute[0] - base_init,  # first A-LoL run: empty cache
        "cached_init_extra_s": (statistics.median(cached_init) - base_init) if cached_init else None,
    })
    results["goal_ratio_le_1.15"] = results["ratio"] <= 1.15
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
