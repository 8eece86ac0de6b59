"""What an internal reward adds to a GRPO step, timed part by part inside one run (prints JSON).

Whole-run step times (``benchmarks/rlif_step_time.py``) compare two runs whose generations differ,
and on a GPU generation time varies run to run far more than the signal work costs. Here every
part of every step is timed in the same process, so the internal reward's own work is measured
directly, as a share of the step it sits in:

* ``generation_s``: TRL's ``_generate`` (HF generate or vLLM), without our answer location and
  generation capture;
* ``trl_scoring_pass_s``: TRL's own no-grad policy passes (old log-probs when
  ``num_iterations > 1``), without the signal projection that rides on them;
* ``signal_projection_s``: :func:`trainers.signals.token_signals` in the backbone hook, riding on
  TRL's pass (case ``riding``);
* ``generation_capture_s``: with HF generation and no TRL pass (case ``extra_pass``: the route
  RLIF logs as ``generation``), the forward hooks that keep each decoding step's states plus the
  projection of those states after generation (``_signals_from_generation``). On CUDA the hooks
  are timed without synchronising (their small copies run inside generation's own time);
* ``extra_pass_s``: the no-grad policy pass RLIF adds when TRL runs none and the generation
  capture is off or failed (``INTRINSIC_GENERATION_CAPTURE_MIB=0``), projection included;
* ``rewards_s``: the rest of ``_calculate_rewards`` (signal hand-over, logit-lens readout, the
  reward functions, metrics);
* ``answer_location_s``: where each completion's answer is (internal consistency only);
* ``optimisation_s``: the rest of the step (loss forward and backward, optimizer, TRL bookkeeping).

``added_share = (signal_projection + generation_capture + extra_pass + rewards + answer_location) / step``, summed over
the measured steps: the first ``--warmup`` dropped (rounded up to whole generation cycles, since
TRL generates every ``num_iterations`` steps), then whole cycles only. This counts every reward call as added work
(a plain GRPO run would still call its text rewards), so it is an upper bound. Goals: <= 2 % riding
on TRL's pass (``num_iterations=2``), <= 5 % where TRL runs no pass (``num_iterations=1``; the case keeps
its old name ``extra_pass``; ``route`` says which route RLIF took).

Secondary figure (``--whole-runs N``): N constant-reward runs alternate with the measured runs and
``whole_run_ratio`` is the median over runs of the mean step time of the internal-reward runs over
that of the constant ones
(the old benchmark's number; noisy where generation is).

    python benchmarks/rlif_step_parts.py                         # tiny CPU shape
    python benchmarks/rlif_step_parts.py --shape 0.5b            # Qwen2.5-0.5B shape, bf16 (CUDA)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer, TrainerCallback  # noqa: E402

import trainers.lens as lens_module  # noqa: E402
import trainers.rlif as rlif_module  # noqa: E402
from recipes.common.data import load_split  # noqa: E402
from recipes.common.modeling import resolve_model_path  # noqa: E402
from recipes.common.schema import DataConfig  # noqa: E402
from rewards import InternalConsistency, Reward, SelfCertainty  # noqa: E402
from trainers import RLIFConfig, RLIFTrainer  # noqa: E402

REWARDS = {"self_certainty": SelfCertainty, "internal_consistency": InternalConsistency}
GOALS = {"riding": 0.02, "extra_pass": 0.05}
CASES = {"riding": 2, "extra_pass": 1}  # num_iterations
SHAPES = {  # per-device batch, generations per prompt, completion tokens
    "tiny": dict(model="tiny://qwen2?layers=4&hidden=256&intermediate=1024", batch=32, generations=8, tokens=32),
    "0.5b": dict(model=None, batch=16, generations=4, tokens=256),
}


def qwen05b_dir(directory: Path) -> str:
    """A random-init Qwen2.5-0.5B-shaped model (24 x 896, V = 151,936), every head row a token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from recipes.common.tiny.tokenizer import build_char_tokenizer

    vocab = 151_936
    tok = build_char_tokenizer(model_max_length=2048, vocab_size=vocab)
    config = Qwen2Config(vocab_size=vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, dtype="bfloat16")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


class ConstantReward(Reward):
    """The cheapest possible text reward: plain GRPO's cost without reward work."""

    def score(self, completion, **row):
        return 1.0


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Parts(TrainerCallback):
    """Per-step totals of the timed parts (``steps``: one dict per optimizer step, ``step_s`` included)."""

    def __init__(self):
        self.steps, self.current, self._t = [], defaultdict(float), None

    def on_step_begin(self, args, state, control, **kw):
        _sync()
        self.current, self._t = defaultdict(float), time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        _sync()
        self.current["step_s"] = time.perf_counter() - self._t
        self.steps.append(dict(self.current))


class Clock:
    """``with clock("name"):`` adds the (CUDA-synchronised) wall time to the current step's part."""

    def __init__(self, parts: Parts):
        self.parts = parts

    def __call__(self, name, sync=True):
        parts = self.parts

        class _Timed:
            def __enter__(self):
                if sync:
                    _sync()
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                if sync:
                    _sync()
                parts.current[name] += time.perf_counter() - self.t

        return _Timed()

    def wrap(self, fn, name):
        def timed(*args, **kwargs):
            with self(name):
                return fn(*args, **kwargs)

        return timed


def measured_trainer(clock: Clock):
    """``RLIFTrainer`` whose overridden methods are timed (each calls the real one)."""

    class Measured(RLIFTrainer):
        _in_extra_pass = False

        def _generate(self, prompts):
            with clock("_generate_total"):
                return super()._generate(prompts)

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if torch.is_grad_enabled() or self._in_extra_pass:
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
            with clock("_trl_scoring_total"):
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

        def _policy_pass(self, completion_ids_list):
            self._in_extra_pass = True
            before = clock.parts.current["_projection_total"]
            try:
                with clock("extra_pass_s"):
                    return super()._policy_pass(completion_ids_list)
            finally:
                self._in_extra_pass = False
                clock.parts.current["_projection_in_extra"] += clock.parts.current["_projection_total"] - before

        def _calculate_rewards(self, *args, **kwargs):
            with clock("_rewards_total"):
                return super()._calculate_rewards(*args, **kwargs)

        def _capture(self, module, args, kwargs, output):
            if getattr(self, "_gen_capture", None) is None:  # (getattr: also times a tree without the capture)
                return super()._capture(module, args, kwargs, output)
            with clock("_capture_hooks", sync=False):
                return super()._capture(module, args, kwargs, output)

        def _signals_from_generation(self, completion_ids_list):
            before = clock.parts.current["_projection_total"]
            try:
                with clock("_generation_signals"):
                    return super()._signals_from_generation(completion_ids_list)
            finally:
                clock.parts.current["_projection_in_generation"] += clock.parts.current["_projection_total"] - before

    return Measured


def _patch(clock: Clock):
    """Time the module-level helpers RLIF calls (the hook's projection, answer location) and the
    logit-lens hooks while they capture a generation."""
    original = (rlif_module.token_signals, rlif_module.locate_answers, lens_module.LogitLens._hook)

    def timed_hook(lens, layer):
        hook = original[2](lens, layer)

        def timed(module, args, output):
            if getattr(lens, "_steps", None) is None:
                return hook(module, args, output)
            with clock("_capture_hooks", sync=False):
                return hook(module, args, output)

        return timed

    rlif_module.token_signals = clock.wrap(original[0], "_projection_total")
    rlif_module.locate_answers = clock.wrap(original[1], "answer_location_s")
    lens_module.LogitLens._hook = timed_hook
    return lambda: (setattr(rlif_module, "token_signals", original[0]),
                    setattr(rlif_module, "locate_answers", original[1]),
                    setattr(lens_module.LogitLens, "_hook", original[2]))


def _args(out_dir, shape, steps, num_iterations, seed, cuda):
    return RLIFConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=shape["batch"],
                      num_generations=shape["generations"], max_completion_length=shape["tokens"], temperature=0.9,
                      learning_rate=1e-6, num_iterations=num_iterations, bf16=cuda, use_cpu=not cuda,
                      gradient_checkpointing=False, report_to=[], save_strategy="no", logging_steps=steps, seed=seed,
                      log_signals=False)


def run(rewards, model_path, data, tok, shape, steps, num_iterations, seed, out_dir, cuda, measured=True):
    parts = Parts()
    clock = Clock(parts)
    restore = _patch(clock) if measured else (lambda: None)
    cls = measured_trainer(clock) if measured else RLIFTrainer
    torch.manual_seed(seed)
    try:
        trainer = cls(model=model_path, reward_funcs=rewards, args=_args(out_dir, shape, steps, num_iterations, seed, cuda),
                      train_dataset=data, processing_class=tok, callbacks=[parts])
        route = trainer.signal_route()[0] if hasattr(trainer, "signal_route") else None  # None: a tree before routes
        trainer.train()
    finally:
        restore()
    for step in parts.steps:
        step["route"] = route
    return parts.steps


def measured(steps: list[dict], warmup: int, cycle: int) -> list[dict]:
    """Steps after the warm-up, in whole generation cycles (TRL generates every ``num_iterations`` steps)."""
    start = -(-warmup // cycle) * cycle
    kept = steps[start:]
    return kept[: len(kept) // cycle * cycle]


def _parts(kept: list[dict]) -> tuple[dict, float, float]:
    """``(parts in seconds, added seconds, step seconds)`` summed over ``kept`` steps."""
    total = {key: sum(s.get(key, 0.0) for s in kept) for key in
             ("step_s", "_generate_total", "_trl_scoring_total", "_projection_total", "extra_pass_s", "_rewards_total",
              "answer_location_s", "_projection_in_extra", "_capture_hooks", "_generation_signals",
              "_projection_in_generation")}
    riding_projection = total["_projection_total"] - total["_projection_in_extra"] - total["_projection_in_generation"]
    capture = total["_capture_hooks"] + total["_generation_signals"]
    parts = {
        "generation_s": total["_generate_total"] - total["answer_location_s"] - capture,
        "trl_scoring_pass_s": total["_trl_scoring_total"] - riding_projection,
        "signal_projection_s": riding_projection,
        "generation_capture_s": capture,
        "extra_pass_s": total["extra_pass_s"],
        "rewards_s": total["_rewards_total"] - total["extra_pass_s"],
        "answer_location_s": total["answer_location_s"],
    }
    parts["optimisation_s"] = total["step_s"] - sum(parts.values())
    added = (parts["signal_projection_s"] + parts["generation_capture_s"] + parts["extra_pass_s"] + parts["rewards_s"]
             + parts["answer_location_s"])
    return parts, added, total["step_s"]


def summarise(kept: list[dict], cycle: int = 1) -> dict:
    """Totals over ``kept`` (``added_share``: summed added work over summed step time) and medians over its
    generation cycles of ``cycle`` steps (``added_share_median``, ``parts_median_s`` per step)."""
    parts, added, step = _parts(kept)
    n = max(len(kept), 1)
    cycles = [_parts(kept[i : i + cycle]) for i in range(0, len(kept) - cycle + 1, cycle)]
    return {"steps_measured": len(kept), "mean_step_s": step / n,
            "parts_mean_s": {k: round(v / n, 5) for k, v in parts.items()},
            "added_mean_s": round(added / n, 5), "added_share": round(added / max(step, 1e-12), 5),
            "added_share_median": round(statistics.median(a / max(s, 1e-12) for _, a, s in cycles), 5) if cycles else None,
            "parts_median_s": {k: round(statistics.median(p[k] for p, _, _ in cycles) / cycle, 5) for k in parts}
            if cycles else {}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--model", help="override the shape's model (a tiny:// URI or a directory)")
    parser.add_argument("--reward", choices=[*REWARDS, "both"], default="both")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="first steps dropped (kernel compilation, caches)")
    parser.add_argument("--whole-runs", type=int, default=1, help="constant-reward runs per case (secondary figure)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    shape, cuda = dict(SHAPES[args.shape]), args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is visible")
    rewards = list(REWARDS) if args.reward == "both" else [args.reward]
    data = load_split(DataConfig(path="tiny://arithmetic?n_train=4000"), "train").remove_columns(["completion"])
    report = {"shape": args.shape, "device": args.device, "steps": args.steps, "warmup": args.warmup,
              "per_device_batch": shape["batch"], "num_generations": shape["generations"],
              "max_completion_length": shape["tokens"], "torch_threads": torch.get_num_threads(),
              "goals": {f"{case}_share_le": goal for case, goal in GOALS.items()}, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model or shape["model"]
        model_path = resolve_model_path(model_path) if model_path else qwen05b_dir(Path(tmp) / "qwen05b")
        report["model"] = args.model or shape["model"] or "Qwen2.5-0.5B shape (random init, bf16, V=151,936)"
        tok = AutoTokenizer.from_pretrained(model_path)
        for case, iters in CASES.items():
            entry = report["cases"][case] = {"num_iterations": iters}
            constant, internal = [], defaultdict(list)
            for _ in range(max(args.whole_runs, 1)):
                if args.whole_runs:
                    steps = run([ConstantReward()], model_path, data, tok, shape, args.steps, iters, args.seed, tmp,
                                cuda, measured=False)
                    constant.append(statistics.fmean(s["step_s"] for s in measured(steps, args.warmup, iters)))
                for name in rewards:
                    internal[name].append(run([REWARDS[name]()], model_path, data, tok, shape, args.steps, iters,
                                              args.seed, tmp, cuda))
            for name in rewards:
                runs = internal[name]
                summary = summarise([s for steps in runs for s in measured(steps, args.warmup, iters)], iters)
                summary["route"] = runs[0][0]["route"] if runs and runs[0] else None
                summary["goal_met"] = summary["added_share"] <= GOALS[case]
                if constant:
                    medians = [statistics.fmean(s["step_s"] for s in measured(steps, args.warmup, iters))
                               for steps in runs]
                    summary["whole_run_ratio"] = round(statistics.median(medians) / statistics.median(constant), 4)
                    summary["whole_run_mean_step_s"] = {"constant_reward": constant, name: medians}
                entry[name] = summary
    report["all_goals_met"] = all(entry[name]["goal_met"] for entry in report["cases"].values() for name in rewards)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
